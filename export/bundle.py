"""Writing a bundle (``rexedge export CHECKPOINT --out BUNDLE``): graphs, head, tokenizer, manifest.

The checkpoint is read one tensor at a time (:func:`rexedge.runtime.model.checkpoint.iter_checkpoint_tensors`)
and each tensor goes straight to where it belongs: the embedding to ``embed_tokens.npy``
(float32, memory-mapped by the runtime), ``visual.*`` to ``vision.onnx.data`` and the
decoder's tensors to ``decoder.onnx.data``, converted to the bundle precision, with
linear weights transposed to [in, out] for MatMul. Only then are the two graphs written
(they reference the data by offset), so exporting the 3B model holds about one tensor in
memory. Everything is written into ``BUNDLE.partial`` and renamed at the end: a failed
export never leaves something that looks like a bundle. The layout and manifest are
described in :mod:`rexedge.runtime.bundle`.

An AutoAWQ checkpoint (:mod:`rexedge.runtime.model.awq`) exports to an int4 bundle: the decoder's
AWQ layers keep their integers, zero points and scales, repacked for the graph
(:meth:`rexedge.export.onnx.nbits.NBitsWeights.repack`), never re-quantized.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto

from rexedge.export.onnx.blocked_dq import BlockedDQWeights
from rexedge.export.onnx.decoder import BATCH, FLAVOURS, KV_CAPACITY, PAST, PRESENT, TOKENS, build_decoder_graph
from rexedge.export.onnx.graph import ExternalData
from rexedge.export.onnx.head import build_head_graph, quantize_head
from rexedge.export.onnx.nbits import NBitsWeights
from rexedge.export.onnx.vision import MERGED, PATCHES, WINDOWS, build_vision_graph
from rexedge.export.onnx.vision_int8 import quantize_vision
from rexedge.export.tensorrt.profiles import decoder_profiles, vision_profiles
from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.base import DEFAULT_MAX_CONTEXT
from rexedge.runtime.bundle import seal_manifest, staged_bundle
from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.model.awq import AwqSettings, AwqWeight
from rexedge.runtime.model.checkpoint import EMBED, expected_tensor_shapes, iter_checkpoint_tensors, open_checkpoint
from rexedge.runtime.request.preprocess import MAX_PIXELS, MIN_PIXELS
from rexedge.runtime.request.tokenizer import Tokenizer

_DTYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64",
                TensorProto.INT32: "int32", TensorProto.BOOL: "bool"}


class ExportError(RexEdgeError, ValueError):
    """A checkpoint that cannot be exported, or an output directory that cannot be written."""


def _stored_layout(name: str, array: np.ndarray) -> np.ndarray:
    """A checkpoint tensor in the layout the graphs use: linear weights [in, out], the patch conv as a matrix."""
    if name == "visual.patch_embed.proj.weight":
        return array.reshape(array.shape[0], -1).T
    if array.ndim == 2:
        return array.T
    return array


def _max_windows(cfg: RexOmniConfig, max_merged: int) -> int:
    """Most attention windows any merged grid of at most ``max_merged`` tokens can have (partial windows count)."""
    w = cfg.window_merged
    return max(math.ceil(h / w) * math.ceil((max_merged // h) / w) for h in range(1, max_merged + 1))


def _dim_ranges(cfg: RexOmniConfig, flavour: str) -> dict[str, dict[str, tuple[int, int]]]:
    per_patch = cfg.patch_size ** 2
    min_patches, max_patches = MIN_PIXELS // per_patch, MAX_PIXELS // per_patch
    max_merged = max_patches // cfg.merge_unit
    longest = cfg.max_position_embeddings
    cache = ({PAST: (0, longest - 1), PRESENT: (1, longest)} if flavour == "trt" else {KV_CAPACITY: (1, longest)})
    return {
        schema.VISION: {PATCHES: (min_patches, max_patches), MERGED: (min_patches // cfg.merge_unit, max_merged),
                   WINDOWS: (1, _max_windows(cfg, max_merged))},
        # both flavours step rows of different lengths together (batched decoding): the ort flavour's
        # GroupQueryAttention takes a length per row, the trt flavour's key_valid masks each row's holes (its
        # engines' decode profile sets how many rows they take, see rexedge.export.tensorrt.profiles)
        schema.DECODER: {BATCH: (1, schema.MAX_BATCH), TOKENS: (1, longest), **cache},
    }


def _trt_profiles(cfg: RexOmniConfig, key: str, graph: dict[str, Any]) -> list[dict[str, Any]]:
    """TensorRT optimization profiles of a trt-flavour bundle's graph (see :mod:`rexedge.export.tensorrt.profiles`)."""
    if key == schema.VISION:
        return vision_profiles(cfg, graph[schema.INPUTS], graph[schema.DIMS])
    return decoder_profiles(graph[schema.INPUTS], min(DEFAULT_MAX_CONTEXT, cfg.max_position_embeddings))


def _describe(values: Iterable[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
    described = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        described.append({"name": v.name, "dtype": _DTYPE_NAMES[t.elem_type], "shape": shape})
    return described


def _check_tokenizer(cfg: RexOmniConfig, tokenizer: Tokenizer, where: Path) -> None:
    ids = tokenizer.ids
    pairs = [("image_token_id", cfg.image_token_id, "<|image_pad|>", ids.image_pad),
             ("vision_start_token_id", cfg.vision_start_token_id, "<|vision_start|>", ids.vision_start),
             ("vision_end_token_id", cfg.vision_end_token_id, "<|vision_end|>", ids.vision_end)]
    for field, in_config, token, in_tokenizer in pairs:
        if in_config != in_tokenizer:
            raise ExportError(f"{where}: config.json {field} is {in_config}, but the tokenizer gives {token} "
                              f"id {in_tokenizer}")
    if ids.coord_start + ids.num_coords > cfg.vocab_size:
        raise ExportError(f"{where}: coordinate tokens end at id {ids.coord_start + ids.num_coords}, beyond the "
                          f"embedding's {cfg.vocab_size} rows")



def export_bundle(checkpoint: str | Path, out: str | Path, precision: str = "fp32", flavour: str = "ort",
                  progress: bool = True, weights: str | None = None, nbits_options: Mapping[str, Any] | None = None,
                  vision_weights: str | None = None, pixels: tuple[int, int] | None = None) -> Path:
    """Export a checkpoint directory to a bundle at ``out`` (must not exist, or be empty); returns ``out``.

    ``precision`` "fp32" or "fp16" (weights, activations and KV cache; inputs, outputs,
    norms, softmax and the head table stay float32). ``flavour`` selects how the graphs
    express attention and the KV cache (see :mod:`rexedge.export.onnx.decoder` and
    :mod:`rexedge.export.onnx.vision`). ``weights`` "int4" or "int8" quantizes the decoder's
    linear weights (fp32 activations) as MatMulNBits in the ort flavour (see
    :mod:`rexedge.export.onnx.nbits`), with the int8 full-vocabulary head graph
    (:mod:`rexedge.export.onnx.head`), as blocked DequantizeLinear + MatMul in the trt flavour (int4
    only, see :mod:`rexedge.export.onnx.blocked_dq`), None keeps them in the precision; ``nbits_options``
    overrides :class:`~rexedge.export.onnx.nbits.NBitsWeights`' block settings (tests, measurements).
    An AWQ checkpoint gives int4 weights whatever ``weights`` is None or "int4": its own (module docstring).
    ``vision_weights`` "int8": the vision graph with int8 weights and activations, by ONNX Runtime's dynamic
    quantization (ort flavour, fp32; see :mod:`rexedge.export.onnx.vision_int8`); None keeps it float.
    ``pixels`` (min_pixels, max_pixels): the image-size range the model was trained for, recorded in the
    manifest as the bundle's default (a model trained on small images); None: the official wrapper's defaults.
    """
    import torch
    from tqdm import tqdm

    if precision not in schema.PRECISIONS:
        raise ExportError(f"precision {precision!r}: expected one of {list(schema.PRECISIONS)}")
    if flavour not in FLAVOURS:
        raise ExportError(f"decoder flavour {flavour!r}: expected one of {sorted(FLAVOURS)}")
    try:
        pixel_range = None if pixels is None else schema.pixels_entry(*pixels)
    except (TypeError, ValueError) as e:
        raise ExportError(f"pixels {pixels!r}: expected (min_pixels, max_pixels): {e}") from None
    if vision_weights not in (None, "int8"):
        raise ExportError(f"vision_weights {vision_weights!r}: expected 'int8' (or none: float)")
    if vision_weights is not None and (flavour, precision) != ("ort", "fp32"):
        raise ExportError(f"vision_weights {vision_weights!r} needs the ort flavour at fp32 (ONNX Runtime's "
                          f"MatMulInteger on a CPU), not {flavour} at {precision}")
    if weights is not None and weights not in schema.WEIGHT_FORMATS:
        raise ExportError(f"weights {weights!r}: expected one of {list(schema.WEIGHT_FORMATS)} (or none: float)")
    checkpoint, out = Path(checkpoint), Path(out)
    opened = open_checkpoint(checkpoint)
    cfg = opened.config
    nbits = _weight_format(weights, precision, flavour, nbits_options, opened.awq, checkpoint)
    if not cfg.tie_word_embeddings:
        raise ExportError(f"{checkpoint / 'config.json'}: tie_word_embeddings is false; bundles hold one table for "
                          f"the input embedding and the head, so only tied checkpoints can be exported")
    tokenizer = Tokenizer.from_dir(checkpoint)
    _check_tokenizer(cfg, tokenizer, checkpoint)
    with staged_bundle(out, ExportError) as staging:
        np_dtype = np.float16 if precision == "fp16" else np.float32
        vision_data = ExternalData(staging / (schema.VISION_FILE + schema.DATA_SUFFIX))
        decoder_data = ExternalData(staging / (schema.DECODER_FILE + schema.DATA_SUFFIX))
        # the head graph is ONNX Runtime's MatMulNBits: the ort flavour's (TensorRT bundles keep the float table)
        head_data = (ExternalData(staging / (schema.HEAD_GRAPH_FILE + schema.DATA_SUFFIX))
                     if nbits is not None and flavour == "ort" else None)
        head_nbits = None
        total = len(expected_tensor_shapes(cfg))
        with tqdm(total=total, desc="export: weights", unit="tensor", disable=not progress) as bar:
            for name, tensor, file in iter_checkpoint_tensors(checkpoint, dtype=torch.float32, awq_packed=True):
                bar.update()
                if isinstance(tensor, AwqWeight):
                    if nbits is not None and nbits.applies_to(name):
                        q, zeros = tensor.unpack()
                        scales = tensor.scales.float().numpy()   # fp16 in AutoAWQ files: exact in float32
                        for part, packed in nbits.repack(name, q.numpy(), zeros.numpy(), scales).items():
                            decoder_data.add(part, packed, nbits.packed_as(part))
                        continue
                    tensor = tensor.dequantize(torch.float32)   # an AWQ layer outside the decoder's linear layers
                array = tensor.numpy()
                if name == EMBED:
                    np.save(staging / schema.HEAD_FILE, array)
                    if head_data is not None:
                        head_nbits, head_arrays = quantize_head(array)
                        for part, packed in head_arrays.items():
                            head_data.add(part, packed)
                        del head_arrays
                    continue
                stored = _stored_layout(name, array).astype(np_dtype)
                if not np.isfinite(stored).all():
                    raise ExportError(f"tensor {name!r} in {file} does not fit {precision} (values overflow to "
                                      f"inf); export with --dtype fp32")
                if nbits is not None and nbits.applies_to(name):
                    for part, packed in nbits.quantize(name, stored).items():
                        decoder_data.add(part, packed, nbits.packed_as(part))
                    continue
                (vision_data if name.startswith("visual.") else decoder_data).add(name, stored)
        for data in (vision_data, decoder_data, head_data):
            if data is not None:
                data.close()
        head_graph = None
        if head_data is not None and head_nbits is not None:
            onnx.save(build_head_graph(cfg, head_data.tensors, head_nbits), staging / schema.HEAD_GRAPH_FILE)
            head_graph = {schema.FILE: schema.HEAD_GRAPH_FILE, schema.DATA: head_data.path.name,
                          schema.WEIGHTS: head_nbits.manifest_entry()}

        graphs = {}
        dims = _dim_ranges(cfg, flavour)
        for key, file, data, build in (
            (schema.VISION, schema.VISION_FILE, vision_data,
             lambda: build_vision_graph(cfg, vision_data.tensors, precision, flavour)),
            (schema.DECODER, schema.DECODER_FILE, decoder_data,
             lambda: build_decoder_graph(cfg, decoder_data.tensors, precision, flavour, nbits)),
        ):
            if progress:
                print(f"export: writing {file}", flush=True)
            model = build()
            onnx.save(model, staging / file)
            graphs[key] = schema.graph_entry(file, data.path.name, _describe(model.graph.input),
                                             _describe(model.graph.output), dims[key])
            if key == schema.DECODER and nbits is not None:
                graphs[key][schema.WEIGHTS] = nbits.manifest_entry()
            if key == schema.VISION and vision_weights is not None:
                if progress:
                    print("export: quantizing the vision graph to int8 (ONNX Runtime, dynamic)", flush=True)
                int8_file, int8_data, entry = quantize_vision(staging / file, staging)
                for name in (file, data.path.name):   # the float graph is not part of this bundle
                    (staging / name).unlink()
                graphs[key].update({schema.FILE: int8_file, schema.DATA: int8_data, schema.WEIGHTS: entry})
            if flavour == "trt":
                graphs[key][schema.PROFILES] = _trt_profiles(cfg, key, graphs[key])
        tokenizer.save(staging / schema.TOKENIZER_FILE)

        ids = tokenizer.ids
        manifest: dict[str, Any] = {
            schema.FORMAT_KEY: schema.FORMAT,
            schema.VERSION_KEY: schema.FORMAT_VERSION,
            schema.SOURCE: {"checkpoint": checkpoint.name, "digest": opened.digest()},
            schema.CONFIG: cfg.to_hf_dict(),
            schema.PRECISION: precision,
            schema.FLAVOUR: flavour,
            schema.TOKENS: asdict(ids),
            schema.HEAD: schema.head_entry(cfg.vocab_size, cfg.hidden_size,
                                           (ids.coord_start, ids.coord_start + ids.num_coords), head_graph),
            schema.GRAPHS: graphs,
        }
        if pixel_range is not None:
            manifest[schema.PIXELS] = pixel_range
        if progress:
            print("export: hashing files", flush=True)
        seal_manifest(staging, manifest)
    return out


def _weight_format(weights: str | None, precision: str, flavour: str, options: Mapping[str, Any] | None,
                   awq: AwqSettings | None, checkpoint: Path) -> NBitsWeights | None:
    """The decoder's quantized-weight format, or None for float weights; refuses what cannot be exported."""
    options = dict(options or {})
    if awq is not None:
        if weights not in (None, "int4"):
            raise ExportError(f"{checkpoint} is an AWQ 4-bit checkpoint: its bundle keeps those int4 weights; "
                              f"weights {weights!r} would re-quantize them (export it without --weights)")
        fixed = {"block_size": awq.group_size, "symmetric": False}
        clash = {k: v for k, v in options.items() if k in fixed and v != fixed[k]}
        if clash:
            raise ExportError(f"{checkpoint} is an AWQ checkpoint with group_size {awq.group_size} and zero points; "
                              f"{clash} would not be its weights")
        weights = "int4"
        options.update(fixed, origin="awq")
    if weights is None:
        return None
    if precision != "fp32":
        raise ExportError(f"weights {weights!r} is for fp32 activations, not {precision!r}")
    if flavour == "ort":
        return NBitsWeights(weights, **options)
    if weights != "int4":
        raise ExportError(f"weights {weights!r} with flavour {flavour!r}: TensorRT's weight-only form (blocked "
                          f"DequantizeLinear) takes INT4 blocks only; use --weights int4 or the ort flavour")
    return BlockedDQWeights(weights, **options)


def export_command(args: Any) -> None:
    """``rexedge export CHECKPOINT --out BUNDLE [--dtype fp32|fp16] [--flavour ort|trt] [--weights int4|int8]
    [--vision-weights int8] [--min-pixels N --max-pixels N] [--quiet]``."""
    if (args.min_pixels is None) != (args.max_pixels is None):
        raise ExportError("--min-pixels and --max-pixels go together (the range the model was trained for)")
    pixels = None if args.min_pixels is None else (args.min_pixels, args.max_pixels)
    path = export_bundle(args.checkpoint, args.out, precision=args.dtype, flavour=args.flavour,
                         progress=not args.quiet, weights=args.weights, vision_weights=args.vision_weights,
                         pixels=pixels)
    size = sum(p.stat().st_size for p in path.iterdir())
    entry = json.loads((path / schema.MANIFEST).read_text())[schema.GRAPHS][schema.DECODER].get(schema.WEIGHTS)
    quantized = f", {entry['format']} decoder weights ({entry['origin']})" if entry else ""
    print(f"wrote a {args.dtype} bundle ({args.flavour} decoder{quantized}, {size / 2**20:.1f} MiB) to {path}")
