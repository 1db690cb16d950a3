"""The static TensorRT-parser check: trt-flavour graphs pass, contrib ops and each restriction are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rexedge.export.bundle import export_bundle
from rexedge.export.tensorrt.ops import (
    TrtCompatibilityError,
    check_graph_file,
    check_model,
    load_support,
    require_trt_compatible,
)


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("static")
    return {"trt": export_bundle(tiny_checkpoint, root / "trt", flavour="trt", progress=False),
            "trt-fp16": export_bundle(tiny_checkpoint, root / "trt16", flavour="trt", precision="fp16",
                                      progress=False),
            "ort": export_bundle(tiny_checkpoint, root / "ort", flavour="ort", progress=False)}


@pytest.mark.parametrize("flavour", ["trt", "trt-fp16"])
@pytest.mark.parametrize("graph", ["vision.onnx", "decoder.onnx"])
def test_trt_flavour_graphs_pass(bundles: dict[str, Path], flavour: str, graph: str) -> None:
    assert check_graph_file(bundles[flavour] / graph) == []
    require_trt_compatible(bundles[flavour] / graph)


def test_ort_flavour_decoder_is_refused_naming_the_contrib_nodes(bundles: dict[str, Path]) -> None:
    path = bundles["ort"] / "decoder.onnx"
    problems = check_graph_file(path)
    gqa = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node
           if n.op_type == "GroupQueryAttention"]
    # exactly the contrib nodes: what they feed is not reported a second time
    assert sorted(p.node for p in problems) == sorted(gqa) and len(gqa) == 2
    assert all("com.microsoft" in p.reason for p in problems)
    with pytest.raises(TrtCompatibilityError, match=f"node '{gqa[0]}' \\(GroupQueryAttention\\): domain "
                                                    f"'com.microsoft'"):
        require_trt_compatible(path)


def _model(nodes: list, inputs: list, outputs: list, initializers: list = (), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _reasons(model: onnx.ModelProto) -> list[str]:
    return [str(p) for p in check_model(model)]


def test_each_restriction_is_enforced() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.INT32, [2, 3])
    w = numpy_helper.from_array(np.ones((3, 4), np.int32), "w")
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [2, 4])
    int_matmul = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [x], [y], [w])
    assert _reasons(int_matmul) == ["node 'mm' (MatMul): input 0 'x' is INT32, TensorRT takes FLOAT, FLOAT16, "
                                    "BFLOAT16", "node 'mm' (MatMul): input 1 'w' is INT32, TensorRT takes FLOAT, "
                                    "FLOAT16, BFLOAT16"]

    f = helper.make_tensor_value_info("f", TensorProto.FLOAT, [2, 3])
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    dynamic_axes = _model([helper.make_node("Unsqueeze", ["f", "axes"], ["out"], name="u")], [f, axes], [out])
    assert _reasons(dynamic_axes) == ["node 'u' (Unsqueeze): input 1 'axes' must be a constant (an initializer or "
                                      "a Constant node)"]

    q = helper.make_tensor_value_info("q", TensorProto.INT8, [2, 3])
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(3, np.int8), "zero")
    asymmetric = _model([helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["out"], name="dq")],
                        [q], [out], [scale, zero])
    assert _reasons(asymmetric) == ["node 'dq' (DequantizeLinear): input 2 'zero' must be a constant zero "
                                    "(symmetric quantization)"]
    symmetric = _model([helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["out"], name="dq")],
                       [q], [out], [scale, numpy_helper.from_array(np.array(0, np.int8), "zero")])
    assert _reasons(symmetric) == []

    indices = numpy_helper.from_array(np.zeros((1, 1), np.int64), "idx")
    updates = numpy_helper.from_array(np.ones((1, 3), np.float32), "upd")
    scatter_add = _model([helper.make_node("ScatterND", ["f", "idx", "upd"], ["out"], name="s", reduction="add")],
                         [f], [out], [indices, updates])
    assert _reasons(scatter_add) == ["node 's' (ScatterND): attribute reduction='add' is not supported "
                                     "(TensorRT takes ['none'])"]

    casts = _model([helper.make_node("Cast", ["f"], ["out"], name="c", to=TensorProto.DOUBLE)], [f], [out])
    assert _reasons(casts) == ["node 'c' (Cast): attribute to='DOUBLE' is not supported (TensorRT takes "
                               "['FLOAT', 'FLOAT16', 'BFLOAT16', 'INT32', 'INT64', 'UINT8', 'BOOL'])"]

    unknown = _model([helper.make_node("NonMaxSuppression", ["f", "f"], ["out"], name="nms")], [f], [out])
    assert _reasons(unknown)[0].startswith("node 'nms' (NonMaxSuppression): operator NonMaxSuppression is not "
                                           "supported by TensorRT 10.3")
    newer = _model([helper.make_node("Relu", ["f"], ["out"], name="r")], [f], [out], opset=22)
    assert _reasons(newer) == ["node '<model>' (opset_import): default-domain opset 22; TensorRT 10.3 parses "
                               "opsets 9..21"]

    # blocked scales (opset 21) for INT4 only: INT8 weights take per-tensor or per-channel scales
    blocked = {}
    for elem in (TensorProto.INT8, TensorProto.INT4):
        w = helper.make_tensor("w", elem, [4, 2], [1, -2, 3, -4, 5, -6, 7, 0])
        block_scale = numpy_helper.from_array(np.full((2, 2), 0.5, np.float32), "s")
        blocked[elem] = _model([helper.make_node("DequantizeLinear", ["w", "s"], ["out"], name="dq", axis=0,
                                                 block_size=2)], [], [out], [w, block_scale], opset=21)
    assert _reasons(blocked[TensorProto.INT8]) == ["node 'dq' (DequantizeLinear): blocked quantization (block_size "
                                                   "2) of INT8; TensorRT blocks INT4 only"]
    assert _reasons(blocked[TensorProto.INT4]) == []


def test_support_list_says_where_it_came_from() -> None:
    support = load_support()
    assert support["tensorrt"] == "10.3"
    assert "onnx-tensorrt" in support["source"] and "operators.md" in support["source"]
    for op, spec in support["operators"].items():
        assert spec["types"], op
        assert all(int(i) >= 0 for i in spec.get("input_types", {})), op
