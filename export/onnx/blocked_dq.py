"""Weight-only INT4 for the trt flavour: blocked ``DequantizeLinear`` + ``MatMul`` (TensorRT 10's form).

The same integers, zero points and scales as the ort flavour's MatMulNBits (ONNX Runtime's
quantizer at export, or an AWQ checkpoint's, repacked), in the form TensorRT's ONNX parser
turns into a weight-only INT4 GEMM: an INT4 initializer W [K, N] and float scales
[K/block, N] into ``DequantizeLinear`` (opset 21: ``axis`` 0, ``block_size``), then ``MatMul``.

TensorRT quantizes symmetrically only (its parser refuses a non-zero zero point) and
blocks INT4 only (INT8 takes per-tensor or per-channel scales). Zero points are therefore
moved out of the dequantization, exactly: with signed values w = q - 8 and z' = zero - 8,

    x @ ((q - zero) * s) = x @ (w * s) - (per-block sums of x) @ (z' * s)

The second product is [T, K/block] x [K/block, N], 1/block of the first one's work; its
table z' * s is exact in float32 (|z'| <= 8, an AWQ scale has 11 significant bits). A
symmetric quantization (all zero points 8) needs no correction and gets none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from rexedge.export.onnx.graph import GraphBuilder
from rexedge.export.onnx.nbits import NBitsWeights, unpack_along_last

DQ_OPSET = 21
_OFFSET = 8   # uint4 0..15 -> int4 -8..7

# initializer names beside the weight's published name
_INT4, _SCALES, _CORRECTION = ".int4", ".dq_scales", ".zero_correction"


@dataclass
class BlockedDQWeights(NBitsWeights):
    """:class:`~rexedge.export.onnx.nbits.NBitsWeights` in the trt flavour's form (module docstring)."""

    corrected: set[str] = field(default_factory=set)   # weights with non-zero zero points

    op = "DequantizeLinear"
    opset = DQ_OPSET

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits != 4:
            raise ValueError(f"weights {self.weights!r}: TensorRT's blocked DequantizeLinear takes INT4 only "
                             f"(INT8 weights there are per-channel, not these blocks)")

    def _from_nbits(self, name: str, k: int, n: int, packed: np.ndarray, scales: np.ndarray,
                    zero_points: np.ndarray) -> dict[str, np.ndarray]:
        """ONNX Runtime's quantizer wrote MatMulNBits' layout: back to integers [K, N] and [blocks, N]."""
        blocks = packed.shape[1]
        q = unpack_along_last(packed, self.bits, packed.shape[2] * 2).reshape(n, -1)[:, :k].T
        if self.symmetric:
            zeros = np.full((blocks, n), _OFFSET, np.uint8)
        else:
            zeros = unpack_along_last(zero_points, self.bits, blocks).T
        return self._from_integers(name, np.ascontiguousarray(q), np.ascontiguousarray(zeros), scales.T)

    def _from_integers(self, name: str, q: np.ndarray, zeros: np.ndarray, scales: np.ndarray
                       ) -> dict[str, np.ndarray]:
        (k, n), blocks = q.shape, zeros.shape[0]
        if k % blocks or (blocks > 1 and k != blocks * self.block_size) or n % 2:
            # per-block sums reshape K into equal blocks; TensorRT infers the block from the shapes and
            # packs INT4 along an even last dimension
            raise ValueError(f"{name}: [{k}, {n}] does not split into blocks of {self.block_size} rows with an "
                             f"even number of columns")
        signed = (q.astype(np.int16) - _OFFSET).astype(np.uint8) & 0x0F          # two's complement nibbles
        flat = signed.reshape(-1)
        self.shapes[name] = (k, n)
        arrays = {name + _INT4: flat[0::2] | (flat[1::2] << 4), name + _SCALES: np.ascontiguousarray(scales)}
        shifted = zeros.astype(np.float32) - _OFFSET
        if shifted.any():
            self.corrected.add(name)
            arrays[name + _CORRECTION] = shifted * scales
        return arrays

    def packed_as(self, initializer: str) -> tuple[int, list[int]] | None:
        """How ``ExternalData.add`` stores an initializer this form made: INT4 [K, N] for the weights."""
        if initializer.endswith(_INT4):
            return TensorProto.INT4, list(self.shapes[initializer.removesuffix(_INT4)])
        return None

    def matmul(self, g: GraphBuilder, x: str, name: str) -> str:
        """x @ W: DequantizeLinear (axis 0, blocks of K) and MatMul, less the zero points' share."""
        k, n = self.shapes[name]
        weight = g.op("DequantizeLinear", g.weight(name + _INT4), g.weight(name + _SCALES), axis=0,
                      block_size=self.block_size, hint="dq_weight")
        y = g.op("MatMul", x, weight, hint="matmul")
        if name not in self.corrected:
            return y
        blocks = g.const([0, 0, -(-k // self.block_size), -1], dtype=np.int64)
        sums = g.op("ReduceSum", g.op("Reshape", x, blocks), g.const([-1], dtype=np.int64), keepdims=0,
                    hint="block_sums")
        return g.op("Sub", y, g.op("MatMul", sums, g.weight(name + _CORRECTION), hint="zero_share"), hint="matmul")
