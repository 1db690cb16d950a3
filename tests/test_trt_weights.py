"""INT4 weights in the trt flavour: blocked DequantizeLinear + MatMul (TensorRT's weight-only form).

The reference is the ort flavour's MatMulNBits bundle of the same checkpoint and settings
(ONNX Runtime's quantizer is deterministic, so both hold the same integers), run with
accuracy_level 1 (float products). ONNX Runtime's CPU provider runs the trt graph twice: with
graph optimizations off, so its DequantizeLinear kernel (INT4, blocked) and MatMul run as
written, and with its default optimizations, which fuse DequantizeLinear + MatMul into its
own MatMulNBits (session option ``session.qdq_matmulnbits_accuracy_level`` 1 keeps that fused
kernel in float).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from test_nbits import _dequantize, _hidden_states, _nbits_nodes, _random_steps
from test_trt_flavour import run_trt_decoder

from rexedge.export.bundle import export_bundle
from rexedge.export.tensorrt.ops import check_graph_file
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.model.checkpoint import load_model

# (ort-flavour options, trt-flavour options): the shipped blocks (128, zero points: corrected), and
# symmetric blocks of 32 (zero point 8 everywhere: no correction) with several blocks per column
VARIANTS = {"b128": {}, "b32-sym": {"block_size": 32, "symmetric": True}}


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("trt_weights")
    made = {}
    for key, options in VARIANTS.items():
        made["ort", key] = export_bundle(tiny_checkpoint, root / f"ort-{key}", weights="int4", progress=False,
                                         nbits_options={**options, "accuracy_level": 1})
        made["trt", key] = export_bundle(tiny_checkpoint, root / f"trt-{key}", weights="int4", flavour="trt",
                                         progress=False, nbits_options=options)
    return made


def dq_weights(bundle: Path) -> dict[str, np.ndarray]:
    """The weight [N, K] each DequantizeLinear + MatMul (less its zero-point share) multiplies by, in numpy."""
    graph = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        name = node.input[0].removesuffix(".int4")
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["axis"] == 0 and inits[node.input[0]].data_type == onnx.TensorProto.INT4
        values = numpy_helper.to_array(inits[node.input[0]], str(bundle)).astype(np.float32)   # [K, N], -8..7
        rows = np.arange(values.shape[0]) // attrs["block_size"]   # the block of each input row
        weight = values * numpy_helper.to_array(inits[node.input[1]], str(bundle))[rows]
        if name + ".zero_correction" in inits:
            weight = weight - numpy_helper.to_array(inits[name + ".zero_correction"], str(bundle))[rows]
        found[name] = weight.T
    return found


def trt_hidden_states(bundle: Path, steps: list[tuple[np.ndarray, np.ndarray]], optimized: bool) -> np.ndarray:
    """The last token's hidden state after each append, the trt decoder run by ONNX Runtime's CPU provider."""
    options = ort.SessionOptions()
    if optimized:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(bundle / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    cfg = load_bundle(bundle).config
    present = [np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.num_hidden_layers)
    got = []
    for embeds, positions in steps:
        hidden, present = run_trt_decoder(session, present, embeds, positions)
        got.append(hidden[-1])
    return np.stack(got)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trt_int4_bundle_is_tensorrt_form(bundles: dict, variant: str) -> None:
    bundle = bundles["trt", variant]
    assert check_graph_file(bundle / "decoder.onnx") == [] and check_graph_file(bundle / "vision.onnx") == []
    graph = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    assert "MatMulNBits" not in ops and ops.count("DequantizeLinear") == 7 * load_bundle(bundle).config.num_hidden_layers
    assert graph.opset_import[0].version == 21 and graph.ir_version == 10
    assert ("ReduceSum" in ops) == (variant == "b128")   # a zero-point share only where zero points are not 8
    entry = load_bundle(bundle).decoder.weights
    ort_entry = load_bundle(bundles["ort", variant]).decoder.weights
    assert (entry["op"], entry["format"], entry["origin"]) == ("DequantizeLinear", "int4", "onnxruntime")
    assert (entry["block_size"], entry["symmetric"], entry["quantized"]) == (
        ort_entry["block_size"], ort_entry["symmetric"], ort_entry["quantized"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trt_and_ort_flavours_hold_the_same_weights(bundles: dict, variant: str) -> None:
    graph, nodes = _nbits_nodes(bundles["ort", variant])
    trt = dq_weights(bundles["trt", variant])
    assert sorted(trt) == sorted(n.input[1].removesuffix(".nbits") for n in nodes)
    for node in nodes:
        want = _dequantize(graph, node, bundles["ort", variant])
        # (q - 8) s - (z - 8) s against (q - z) s: equal up to float32 rounding of the two products
        np.testing.assert_allclose(trt[node.input[1].removesuffix(".nbits")], want, rtol=0,
                                   atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("optimized", [False, True], ids=["dq-kernel", "fused"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trt_graph_on_onnxruntime_matches_the_ort_flavour(tiny_checkpoint: Path, bundles: dict, variant: str,
                                                          optimized: bool) -> None:
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    steps = _random_steps(model.config.hidden_size)
    reference, _ = _hidden_states(model, bundles["ort", variant], steps)
    got = trt_hidden_states(bundles["trt", variant], steps, optimized)
    assert float(np.abs(got - reference).max() / np.abs(reference).max()) <= 1e-4
