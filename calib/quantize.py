"""INT8 bundles with explicit quantization (``rexedge calibrate``): QuantizeLinear / DequantizeLinear graphs.

Explicit Q/DQ is TensorRT's INT8 path (its implicit calibrator is deprecated since 10.1),
and ONNX Runtime runs the same graphs with integer kernels on the CPU. The Q/DQ nodes
are placed by ONNX Runtime's quantization tools (``onnxruntime.quantization.quantize_static``,
QDQ format), not by hand. Why that library rather than NVIDIA ModelOpt's ONNX PTQ: it is
already the runtime's dependency (nothing new to install, nothing that pins onnx /
onnxruntime versions), it calibrates on the CPU of the development machines and of a
Jetson alike, and it runs graphs with ONNX Runtime contrib operators (the ``ort``
flavour's GroupQueryAttention), which the calibration pass has to execute.

What is quantized, in both graphs: every MatMul whose B is a weight (the linear layers),
with int8 weights per output channel (axis 1 of the [in, out] matrices) and int8
activations per tensor, both symmetric (zero point 0, as TensorRT requires). Decode at
batch 1 reads every weight once per token, so int8 weights halve (vs fp16) or quarter
(vs fp32) its bytes; vision and prefill are arithmetic-bound and gain from int8 inputs
to the matrix products. Left in float on purpose: attention (the ``ort`` flavour's
GroupQueryAttention and MultiHeadAttention, or the activation x activation MatMuls of the
``trt`` flavour), norms,
rotary, softmax, and MatMul outputs (no Q/DQ after a product: one rounding fewer, and
the placement TensorRT fuses). The head (the tied embedding, used on the host) stays fp32.

The input must be an fp32 bundle; the output is a new bundle with precision "int8",
the same tokenizer and head, quantized graphs, and a manifest with valid hashes.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import onnx
import onnxruntime
from onnx import helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from rexedge.calib.dataset import (
    CalibrationError,
    DecoderReader,
    VisionReader,
    check_tasks,
    find_images,
    plan_samples,
)
from rexedge.calib.graph_backend import GraphBackend
from rexedge.runtime import manifest as schema
from rexedge.runtime.bundle import Bundle, GraphSpec, load_bundle, seal_manifest, staged_bundle
from rexedge.runtime.request.preprocess import MAX_PIXELS, MIN_PIXELS

# Activation ranges by ONNX Runtime's MinMax calibrator, which reduces each tensor to its min and
# max inside the graph (two numbers per tensor and feed). Its histogram calibrators (percentile,
# entropy) are not offered: they stack every feed's activations into one array, which fails
# for feeds of different shapes (images of different sizes, prompts of different lengths),
# and would hold all activations of the set in memory.
QUANT_OPTIONS: dict[str, Any] = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "OpTypesToExcludeOutputQuantization": ["MatMul"],
    # one Q/DQ pair per consumer: ONNX Runtime fuses Q -> DQ -> MatMul <- DQ(weight) into an
    # integer kernel only when the activation's DQ feeds that MatMul alone (q/k/v and gate/up
    # share an input); a shared pair leaves float MatMuls that dequantize their weights every run
    "DedicatedQDQPair": True,
}


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose second input is an initializer (the linear layers)."""
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def _declare_attention_outputs(model: onnx.ModelProto) -> None:
    """Give GroupQueryAttention's output the type of its query, in place.

    ONNX shape inference does not know contrib operators, and the quantizer only
    calibrates and quantizes tensors whose type it knows: without this the input of every
    o_proj (the attention output) would silently stay float."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and node.output[0] not in known:
            elem = known[node.input[0]].type.tensor_type.elem_type
            model.graph.value_info.append(helper.make_tensor_value_info(node.output[0], elem, None))


def _stage_graph(bundle: Bundle, spec: GraphSpec, workdir: Path) -> tuple[Path, list[str]]:
    """The graph prepared for the quantizer in ``workdir``, and the nodes to quantize.

    The weights are copied beside it: the quantizer loads them relative to the graph, and
    onnx refuses external data reached through a symbolic or hard link."""
    model = onnx.load(str(bundle.path(spec.file)), load_external_data=False)
    _declare_attention_outputs(model)
    staged = workdir / spec.file
    onnx.save(model, str(staged))
    if spec.data:
        shutil.copyfile(bundle.path(spec.data), workdir / spec.data)
    return staged, weight_matmuls(model)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice (pre-processing, shape inference) on the root logger at WARNING."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize_graph(staged: Path, out: Path, nodes: list[str], reader: Any) -> None:
    with _quiet_quantizer():
        quantize_static(
            str(staged), str(out), reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=dict(QUANT_OPTIONS),
        )


def quantized_summary(path: Path) -> dict[str, int]:
    """Counts of Q / DQ nodes and of weight MatMuls fed by a DequantizeLinear, from a written graph."""
    model = onnx.load(str(path), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    fed = [n for n in matmuls if (p := producers.get(n.input[1])) is not None and p.op_type == "DequantizeLinear"]
    return {"quantize_linear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
            "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in model.graph.node),
            "int8_matmuls": len(fed), "float_matmuls": len(matmuls) - len(fed)}



def quantize_bundle(bundle_path: str | Path, out: str | Path, images: str | Path, tasks: Sequence[str] | None = None,
                    num: int = 16, steps: int = 8, seed: int = 0,
                    min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, progress: bool = True) -> Path:
    """Calibrate an fp32 bundle on ``images`` and write its INT8 (Q/DQ) bundle to ``out``; returns ``out``.

    ``num`` samples (an image with a task prompt from ``tasks``, all tasks by default),
    each giving the decoder its prefill and up to ``steps`` decode calls.
    """
    from tqdm import tqdm

    source = load_bundle(bundle_path)
    if source.precision != "fp32":
        raise CalibrationError(f"{source.directory}: a {source.precision} bundle; calibrate an fp32 bundle "
                               f"(rexedge export --dtype fp32): the quantizer reads float32 weights and activations")
    for name, graph in (("decoder", source.decoder), ("vision encoder", source.vision)):
        if graph.weights is not None:
            raise CalibrationError(f"{source.directory}: its {name} has {graph.weights['format']} weights (rexedge "
                                   f"export --weights / --vision-weights); calibrate a bundle exported without them")
    tasks = check_tasks(tasks)
    samples = plan_samples(find_images(images), tasks, num, seed)
    out = Path(out)
    with staged_bundle(out, CalibrationError, label="--out ") as staging:
        workdir = staging / ".work"
        workdir.mkdir()
        backend = GraphBackend(source)
        distinct = len(dict.fromkeys(s.image for s in samples))
        with tqdm(total=distinct, desc="calibrate: vision", unit="image", disable=not progress) as bar:
            vision = VisionReader(backend, samples, min_pixels, max_pixels, progress=bar)
            staged, nodes = _stage_graph(source, source.vision, workdir)
            _quantize_graph(staged, staging / source.vision.file, nodes, vision)
        with tqdm(total=len(samples), desc="calibrate: decoder", unit="sample", disable=not progress) as bar:
            decoder = DecoderReader(backend, samples, min_pixels, max_pixels, steps=steps, progress=bar)
            staged, nodes = _stage_graph(source, source.decoder, workdir)
            _quantize_graph(staged, staging / source.decoder.file, nodes, decoder)
        shutil.rmtree(workdir)
        for spec in (source.vision, source.decoder):  # the quantizer writes its data owner-only
            shutil.copymode(source.path(spec.file), staging / _data_file(spec))
        for name in (source.manifest[schema.HEAD][schema.FILE], schema.TOKENIZER_FILE):
            shutil.copyfile(source.path(name), staging / name)

        summary = {key: quantized_summary(staging / spec.file)
                   for key, spec in ((schema.VISION, source.vision), (schema.DECODER, source.decoder))}
        failures = {**vision.failures, **decoder.failures}
        seal_manifest(staging, _int8_manifest(source, {
            "library": "onnxruntime.quantization",
            "library_version": onnxruntime.__version__,
            "format": "QDQ",
            "operators": "MatMul with a constant weight (linear layers); attention, norms and softmax stay float",
            "weights": "int8, symmetric, per output channel",
            "activations": "int8, symmetric, per tensor",
            "method": "minmax",
            "samples": len(samples),
            "images": distinct - len(failures),
            "tasks": list(tasks),
            "decode_steps": steps,
            "max_pixels": max_pixels,
            "seed": seed,
            "feeds": {schema.VISION: vision.feeds_given, schema.DECODER: decoder.feeds_given},
            "graphs": summary,
            "skipped_images": failures,
            "source_manifest_sha256": source.manifest[schema.DIGEST_KEY],
        }))
    return out


def _data_file(spec: GraphSpec) -> str:
    """Where ONNX Runtime's quantizer puts a quantized graph's weights: beside it, named after it."""
    return spec.file + schema.DATA_SUFFIX


def _int8_manifest(source: Bundle, quantization: dict[str, Any]) -> dict[str, Any]:
    # engines built from the fp32 graphs do not belong to the int8 ones (nor are their files copied)
    manifest = {k: v for k, v in source.manifest.items() if k not in (schema.DIGEST_KEY, schema.ENGINES)}
    manifest[schema.PRECISION] = schema.INT8
    manifest[schema.QUANTIZATION] = quantization
    graphs = manifest[schema.GRAPHS]
    manifest[schema.GRAPHS] = {**graphs, **{key: {**graphs[key], schema.DATA: _data_file(spec)}
                                            for key, spec in ((schema.VISION, source.vision),
                                                              (schema.DECODER, source.decoder))}}
    return manifest


def calibrate_command(args: Any) -> None:
    """``rexedge calibrate BUNDLE --images DIR [--tasks ...] [--num N] [--steps S] [--out BUNDLE_INT8]``."""
    tasks = [t for item in args.tasks for t in item.split(",") if t] if args.tasks else None
    out = Path(args.out) if args.out else Path(args.bundle).with_name(Path(args.bundle).name + "-int8")
    path = quantize_bundle(args.bundle, out, args.images, tasks=tasks, num=args.num, steps=args.steps,
                           seed=args.seed, max_pixels=args.max_pixels, progress=not args.quiet)
    q = load_bundle(path, verify_hashes=False).manifest[schema.QUANTIZATION]
    for graph, counts in q["graphs"].items():
        print(f"{graph}: {counts['int8_matmuls']} int8 MatMuls ({counts['float_matmuls']} float: attention), "
              f"{counts['quantize_linear']} QuantizeLinear, {counts['dequantize_linear']} DequantizeLinear")
    for error in q["skipped_images"].values():
        print(f"skipped: {error}")
    size = sum(p.stat().st_size for p in path.iterdir())
    print(f"wrote an int8 bundle ({q['samples']} samples, {q['feeds'][schema.DECODER]} decoder calls, "
          f"{size / 2**20:.1f} MiB) to {path}")
