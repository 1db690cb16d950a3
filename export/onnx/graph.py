"""A small layer over ``onnx.helper`` for writing the vision and decoder graphs by hand.

Why by hand rather than ``torch.onnx.export``: the graphs need exact control over input
names, symbolic dimensions and a contrib operator (com.microsoft GroupQueryAttention) in
one flavour and standard operators in another; the TorchScript exporter is deprecated and
the dynamo one needs onnxscript. Writing the graph directly from the checkpoint tensors
costs a few hundred lines and needs no tracing.

Weights never sit in the ModelProto: ``ExternalData`` streams every initializer to one
``.onnx.data`` file beside the graph as it arrives, so exporting the 3B model holds one
tensor at a time in memory and the graph itself stays a few hundred kB (ONNX protobufs
are limited to 2 GB).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from rexedge.export.onnx.nbits import NBitsWeights

# The default domain's opset. 17 keeps ReduceMean's axes an attribute and is what
# TensorRT 8.6+ parses; nothing newer is needed, except by the trt flavour's INT4 weights:
# DequantizeLinear takes INT4 and blocked scales from opset 21 (IR version 10) on.
OPSET = 17
_IR_VERSION = {17: 8, 21: 10}   # 8: readable by every onnxruntime >= 1.14 and TensorRT 8.6+
MS_DOMAIN = "com.microsoft"

ONNX_DTYPE: dict[np.dtype, int] = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
    np.dtype(np.uint8): TensorProto.UINT8,   # MatMulNBits' packed weights and zero points
}
# element types stored packed, two per byte (the caller hands over the bytes and the shape)
_PACKED_TYPES = (TensorProto.INT4,)

# ONNX Runtime memory-maps external data whose offset is a multiple of the page size.
_ALIGNMENT = 4096


class ExternalData:
    """Appends initializer bytes to one data file and hands back TensorProtos pointing at them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")
        self._offset = 0
        self.tensors: dict[str, TensorProto] = {}

    def add(self, name: str, array: np.ndarray, packed_as: tuple[int, Sequence[int]] | None = None) -> None:
        """Append ``array`` as initializer ``name``; ``packed_as`` (element type, shape): ``array`` holds the
        bytes of a packed type (INT4: two per byte, the first in the low bits, in ONNX's raw layout)."""
        if name in self.tensors:
            raise ValueError(f"initializer {name!r} written twice")
        if packed_as is not None and (packed_as[0] not in _PACKED_TYPES or array.dtype != np.uint8):
            raise ValueError(f"initializer {name!r}: packed bytes (uint8) of one of {_PACKED_TYPES} expected")
        array = np.ascontiguousarray(array)
        pad = -self._offset % _ALIGNMENT
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        data = array.tobytes()
        self._file.write(data)
        tensor = TensorProto()
        tensor.name = name
        elem_type, shape = packed_as or (ONNX_DTYPE[array.dtype], array.shape)
        tensor.data_type = elem_type
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self._offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += len(data)
        self.tensors[name] = tensor

    def close(self) -> None:
        self._file.close()


class GraphBuilder:
    """Collects nodes, inputs, outputs and initializers; names every intermediate uniquely."""

    def __init__(self, name: str, weights: dict[str, TensorProto], opset: int = OPSET) -> None:
        if opset not in _IR_VERSION:
            raise ValueError(f"opset {opset}: expected one of {sorted(_IR_VERSION)}")
        self.name = name
        self.opset = opset
        self._weights = weights
        self._used_weights: dict[str, TensorProto] = {}
        self._constants: list[TensorProto] = []
        self._nodes: list[onnx.NodeProto] = []
        self._inputs: list[onnx.ValueInfoProto] = []
        self._outputs: list[onnx.ValueInfoProto] = []
        self._value_info: list[onnx.ValueInfoProto] = []
        self._counter = 0

    def _fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    # declarations -------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self._inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        """Expose ``value`` as graph output ``name`` (through an Identity when the names differ)."""
        if value != name:
            self._nodes.append(helper.make_node("Identity", [value], [name], name=f"out_{name}"))
        self._outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def declare_type(self, value: str, elem_type: int) -> str:
        """Record ``value``'s element type in the graph; returns ``value``.

        For the outputs of contrib operators: ONNX shape inference does not know them, so
        without this every tensor downstream is untyped to tools that rely on it (ONNX
        Runtime's quantizer only calibrates tensors whose type it knows)."""
        self._value_info.append(helper.make_tensor_value_info(value, elem_type, None))
        return value

    def weight(self, name: str) -> str:
        """A checkpoint tensor already written to the data file, by its published name."""
        if name not in self._weights:
            raise KeyError(name)
        self._used_weights[name] = self._weights[name]
        return name

    def const(self, value: np.ndarray | float | int | Sequence[int], hint: str = "const", dtype: Any = None) -> str:
        """A small constant stored inside the graph (shapes, axes, frequency tables)."""
        array = np.asarray(value, dtype=dtype)
        name = self._fresh(hint)
        self._constants.append(numpy_helper.from_array(array, name))
        return name

    # nodes -------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, outputs: int | Sequence[str] = 1, domain: str = "",
           hint: str | None = None, **attrs: Any) -> Any:
        """Add one node; returns its output name (or a list of names when it has several)."""
        hint = hint or op_type.lower()
        names = [self._fresh(hint) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self._nodes.append(helper.make_node(op_type, list(inputs), names, name=self._fresh(f"n_{hint}"),
                                            domain=domain or None, **attrs))
        return names[0] if len(names) == 1 else names

    def used_weights(self) -> set[str]:
        return set(self._used_weights)

    def build(self, doc: str, extra_opsets: Sequence[tuple[str, int]] = ()) -> onnx.ModelProto:
        graph = helper.make_graph(self._nodes, self.name, self._inputs, self._outputs,
                                  initializer=self._constants + list(self._used_weights.values()),
                                  value_info=self._value_info)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="rexedge", doc_string=doc)
        model.ir_version = _IR_VERSION[self.opset]
        return model


# Building blocks shared by both graphs ----------------------------------------------


def linear(g: GraphBuilder, x: str, weight: str, bias: str | None = None, nbits: NBitsWeights | None = None) -> str:
    """x @ W (+ b), W stored [in, out] (the exporter transposes the checkpoint's [out, in]).

    A weight that ``nbits`` quantized becomes its MatMulNBits node instead of a MatMul."""
    if nbits is not None and weight in nbits.shapes:
        y = nbits.matmul(g, x, weight)
    else:
        y = g.op("MatMul", x, g.weight(weight), hint="matmul")
    return g.op("Add", y, g.weight(bias), hint="bias") if bias else y


def rms_norm(g: GraphBuilder, x: str, weight: str, eps: float, compute_fp16: bool) -> str:
    """RMSNorm in float32 (as the reference does for half inputs), scaled by the weight in the model dtype.

    Written as Pow / ReduceMean / Add / Sqrt / Div so ONNX Runtime fuses it into its
    SimplifiedLayerNormalization kernel while the graph stays standard ONNX.
    """
    x32 = g.op("Cast", x, to=TensorProto.FLOAT) if compute_fp16 else x
    squares = g.op("Pow", x32, g.const(np.float32(2.0)))
    if g.opset >= 18:   # ReduceMean's axes became an input
        variance = g.op("ReduceMean", squares, g.const([-1], dtype=np.int64), keepdims=1)
    else:
        variance = g.op("ReduceMean", squares, axes=[-1], keepdims=1)
    normed = g.op("Div", x32, g.op("Sqrt", g.op("Add", variance, g.const(np.float32(eps)))), hint="rms")
    if compute_fp16:
        normed = g.op("Cast", normed, to=TensorProto.FLOAT16)
    return g.op("Mul", g.weight(weight), normed, hint="rms_scale")


def silu(g: GraphBuilder, x: str) -> str:
    return g.op("Mul", x, g.op("Sigmoid", x), hint="silu")


def gelu_exact(g: GraphBuilder, x: str, elem_type: int) -> str:
    """0.5 x (1 + erf(x / sqrt 2)); ONNX Runtime fuses the pattern into Gelu."""
    dtype = np.float16 if elem_type == TensorProto.FLOAT16 else np.float32
    erf = g.op("Erf", g.op("Div", x, g.const(np.sqrt(2.0).astype(dtype))))
    return g.op("Mul", g.op("Mul", x, g.op("Add", erf, g.const(dtype(1.0)))), g.const(dtype(0.5)), hint="gelu")


def rotate(g: GraphBuilder, x: str, cos: str, sin_signed: str, head_dim: int) -> str:
    """Rotary embedding, rotate-half convention: x cos + rotate_half(x) sin.

    rotate_half(x) sin = concat(x2, x1) * concat(-sin, sin) with sin_signed the latter, so
    the sign flip lives in the (per-forward) table instead of a Neg per layer.
    """
    half = head_dim // 2
    x1, x2 = g.op("Split", x, g.const([half, half], dtype=np.int64), axis=-1, outputs=2, hint="half")
    swapped = g.op("Concat", x2, x1, axis=-1, hint="swap")
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", swapped, sin_signed), hint="rotary")


def rotary_tables(g: GraphBuilder, angles_half: str, elem_type: int) -> tuple[str, str]:
    """cos and sign-folded sin over the full head dim from angles over half of it (last axis)."""
    angles = g.op("Concat", angles_half, angles_half, axis=-1, hint="angles")
    cos = g.op("Cos", angles)
    sin_half = g.op("Sin", angles_half)
    sin_signed = g.op("Concat", g.op("Neg", sin_half), sin_half, axis=-1, hint="sin_signed")
    if elem_type == TensorProto.FLOAT16:
        cos = g.op("Cast", cos, to=TensorProto.FLOAT16)
        sin_signed = g.op("Cast", sin_signed, to=TensorProto.FLOAT16)
    return cos, sin_signed


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/dim) for i < dim/2, computed in float64 and rounded once to float32."""
    return (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
