"""Static check: would TensorRT's ONNX parser (at the oldest version we target) take this graph?

TensorRT cannot be installed on every machine that exports or tests a bundle, so this
check reads the graph with ``onnx`` only and compares every node with the parser's
support list kept as data in ``onnx_ops.json`` (operator -> supported tensor types,
which inputs those types apply to, inputs that must be constants or zero, attribute
values, the types a blocked quantization takes; ``source`` there says where it came from). Checked per node: the domain (only
the default ONNX domain; contrib operators such as com.microsoft GroupQueryAttention
would need a TensorRT plugin), the opset, the operator, its attributes, and the element
type of each input (from the graph's declarations and ONNX shape inference).

The check errs on the safe side: an operator missing from the list is reported as
unsupported. It does not replace building an engine; it makes a graph that cannot be
built fail at export / build time with the node named, instead of deep in TensorRT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from rexedge.runtime.errors import RexEdgeError

SUPPORT_FILE = Path(__file__).with_name("onnx_ops.json")


class TrtCompatibilityError(RexEdgeError, ValueError):
    """A graph with nodes TensorRT's ONNX parser does not take."""


@dataclass(frozen=True)
class Problem:
    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op_type}): {self.reason}"


@lru_cache(maxsize=None)
def load_support(path: str | Path = SUPPORT_FILE) -> Mapping[str, Any]:
    """The support list (see the module docstring); cached, it is read-only."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


class _Graph:
    """Element types, constant values and producers of a graph's values."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        self.types: dict[str, int] = {t.name: t.data_type for t in model.graph.initializer}
        # shape inference needs no weight values: external initializers keep their type and dims
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            if value.type.tensor_type.elem_type:
                self.types[value.name] = value.type.tensor_type.elem_type

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def value(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            tensor = self.initializers[name]
            base = str(self.base_dir) if self.base_dir else ""
            return numpy_helper.to_array(tensor, base)
        if name in self.constants:
            for attr in self.constants[name].attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None


def _check_node(node: onnx.NodeProto, graph: _Graph, support: Mapping[str, Any], refused: set[str]) -> list[str]:
    reasons = []
    spec = support["operators"].get(node.op_type)
    if spec is None:
        why = support["unsupported"].get(node.op_type, "not in TensorRT's ONNX parser support list")
        return [f"operator {node.op_type} is not supported by TensorRT {support['tensorrt']} ({why})"]
    for attr in node.attribute:
        if attr.name in spec.get("attributes_unsupported", ()):
            reasons.append(f"attribute {attr.name!r} is not supported")
        allowed = spec.get("attributes", {}).get(attr.name)
        if allowed is None:
            continue
        value = onnx.helper.get_attribute_value(attr)
        if attr.name == "to":
            value = _type_name(value)
        elif isinstance(value, bytes):
            value = value.decode()
        if value not in allowed:
            reasons.append(f"attribute {attr.name}={value!r} is not supported (TensorRT takes {allowed})")
    blocked = spec.get("blocked_types")
    block_size = next((a.i for a in node.attribute if a.name == "block_size"), 0)
    if blocked is not None and block_size and node.input[0] in graph.types \
            and _type_name(graph.types[node.input[0]]) not in blocked:
        reasons.append(f"blocked quantization (block_size {block_size}) of {_type_name(graph.types[node.input[0]])}; "
                       f"TensorRT blocks {', '.join(blocked)} only")
    typed = spec.get("typed_inputs")
    for index, name in enumerate(node.input):
        if not name:
            continue  # an omitted optional input
        allowed = spec["types"] if typed is None or index in typed else spec.get("input_types", {}).get(str(index))
        if allowed is not None:
            if name not in graph.types:
                if name in refused:
                    continue  # the refused producer is already reported; its output type is unknowable
                reasons.append(f"input {index} {name!r} has no known element type")
            elif _type_name(graph.types[name]) not in allowed:
                reasons.append(f"input {index} {name!r} is {_type_name(graph.types[name])}, TensorRT takes "
                               f"{', '.join(allowed)}")
        if index in spec.get("constant_inputs", ()) and not graph.is_constant(name):
            reasons.append(f"input {index} {name!r} must be a constant (an initializer or a Constant node)")
        if index in spec.get("zero_inputs", ()):
            value = graph.value(name)
            if value is None or np.any(value != 0):
                reasons.append(f"input {index} {name!r} must be a constant zero (symmetric quantization)")
    return reasons


def check_model(model: onnx.ModelProto, base_dir: Path | None = None,
                support: Mapping[str, Any] | None = None) -> list[Problem]:
    """Every reason TensorRT's parser would refuse ``model``'s nodes; empty when it takes them all.

    ``base_dir`` is where the model's external data lives (to read zero points kept there).
    """
    support = support or load_support()
    problems = []
    opsets = {o.domain or "": o.version for o in model.opset_import}
    lo, hi = support["opset"]["min"], support["opset"]["max"]
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is None or not lo <= default <= hi:
        problems.append(Problem("<model>", "opset_import", f"default-domain opset {default}; TensorRT "
                                f"{support['tensorrt']} parses opsets {lo}..{hi}"))
    graph = _Graph(model, base_dir)
    refused: set[str] = set()  # outputs of refused nodes and of everything computed from them
    for node in model.graph.node:
        name = node.name or f"<unnamed {node.op_type} -> {node.output[0]}>"
        domain = node.domain or ""
        if domain not in support["domains"]:
            reasons = [f"domain {domain!r} is not the ONNX default domain; TensorRT's parser takes it only "
                       f"through a plugin, and none is registered"]
        else:
            reasons = _check_node(node, graph, support, refused)
        if reasons or refused.intersection(node.input):
            refused.update(node.output)
            problems += [Problem(name, node.op_type, reason) for reason in reasons]
    return problems


def check_graph_file(path: str | Path, support: Mapping[str, Any] | None = None) -> list[Problem]:
    """:func:`check_model` on an ONNX file (its weights are not loaded; zero points are read when checked)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return check_model(model, path.parent, support)


def require_trt_compatible(path: str | Path, limit: int = 10) -> None:
    """Raise :class:`TrtCompatibilityError` naming the first ``limit`` refused nodes of the graph at ``path``."""
    problems = check_graph_file(path)
    if problems:
        support = load_support()
        shown = "\n  ".join(str(p) for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise TrtCompatibilityError(
            f"{path}: {len(problems)} node(s) TensorRT {support['tensorrt']}'s ONNX parser does not take "
            f"(export the bundle with --flavour trt):\n  {shown}{more}")
