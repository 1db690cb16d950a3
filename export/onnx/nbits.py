"""Weight-only quantized linear layers: ONNX Runtime's com.microsoft ``MatMulNBits``.

``rexedge export --weights int4|int8`` turns the decoder's linear layers (attention q/k/v/o,
MLP gate/up/down; not the embedding, which is also the head) into ``MatMulNBits`` nodes.
Each weight [K, N] is quantized as it streams out of the checkpoint, one tensor at a
time, by ONNX Runtime's own block quantizer (``quantize_matmul_{4,8}bits``, the C++ routines
its ``DefaultWeightOnlyQuantizer.qbits_block_quant`` calls): blocks of ``block_size`` consecutive
input rows of one output column share a float32 scale and a zero point, and the result is
in the operator's documented layout (``B`` uint8 [N, K/block, block*bits/8], ``scales``
[N * K/block], ``zero_points`` packed along blocks).

The settings, chosen by measurement on this project's CPU (bench/RESULTS.md, 2026-12-05):
- block 128 along K, asymmetric (with zero points): the layout of the published AWQ
  checkpoint (group 128, zeros), so a repacked AWQ bundle and an exported one are the
  same graph; zero points use all 16 int4 levels for 1/8 bit per weight more than symmetric.
- ``accuracy_level`` 4: the activations are quantized to int8 per block inside the kernel
  and multiplied in integers, several times faster than the float path at batch 1; the
  error it adds is of the order of the weights' own quantization error.

An AWQ checkpoint's integers, zero points and scales are repacked into the same layout
(:meth:`NBitsWeights.repack`, ``origin`` "awq"), not re-quantized: ONNX Runtime offers no
routine that packs given integers, so the bytes are laid out here, by the operator's
documented layout above (checked in tests against that documentation and against ONNX
Runtime running the node).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ONNX Runtime's block quantizers, the routines under its MatMulNBitsQuantizer: called directly
# because the quantizer's module imports onnx_ir, which we would need for nothing else
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from rexedge.export.onnx.graph import MS_DOMAIN, OPSET, GraphBuilder
from rexedge.runtime import manifest as schema

BITS = {"int4": 4, "int8": 8}
BLOCK_SIZE = 128
SYMMETRIC = False
ACCURACY_LEVEL = 4

# the decoder's linear weights that become MatMulNBits (published names)
_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")

_QUANTIZERS = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}

# who chose the integers: ONNX Runtime's block quantizer at export, or the checkpoint (AutoAWQ)
ORIGINS = ("onnxruntime", "awq")

# initializer names beside the weight's published name
_PACKED, _SCALES, _ZERO_POINTS = ".nbits", ".scales", ".zero_points"


@dataclass
class NBitsWeights:
    """The quantization settings of one graph, and the [K, N] of every weight quantized so far."""

    weights: str                      # "int4" or "int8"
    block_size: int = BLOCK_SIZE
    symmetric: bool = SYMMETRIC
    accuracy_level: int = ACCURACY_LEVEL
    origin: str = "onnxruntime"
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    op = "MatMulNBits"   # the operator the graph multiplies with (the manifest records it)
    opset = OPSET        # the default-domain opset the graph needs

    def __post_init__(self) -> None:
        if self.weights not in BITS:
            raise ValueError(f"weights {self.weights!r}: expected one of {sorted(BITS)}")
        if self.origin not in ORIGINS:
            raise ValueError(f"origin {self.origin!r}: expected one of {ORIGINS}")

    @property
    def bits(self) -> int:
        return BITS[self.weights]

    @staticmethod
    def applies_to(name: str) -> bool:
        """Whether the checkpoint tensor ``name`` is a decoder linear weight this module quantizes."""
        return _LINEAR.fullmatch(name) is not None

    def quantize(self, name: str, weight: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [K, N] -> the initializers of its MatMulNBits node, by name."""
        k, n = weight.shape
        return self._from_nbits(name, k, n, *self._pack(np.ascontiguousarray(weight, dtype=np.float32)))

    def quantize_rows(self, name: str, rows: np.ndarray, chunk: int = 8192) -> dict[str, np.ndarray]:
        """float [N, K] (a table whose rows are the product's output columns: the tied embedding as the
        head, logits = hidden @ rows.T) -> the initializers of its MatMulNBits node, by name.

        Every output column is quantized on its own, so the table is quantized ``chunk`` rows at a
        time and the pieces stacked: a transposed float copy of the whole table is never made."""
        n, k = rows.shape
        pieces = [self._pack(np.ascontiguousarray(rows[i:i + chunk].T, dtype=np.float32)) for i in range(0, n, chunk)]
        return self._from_nbits(name, k, n, *(np.concatenate(parts) for parts in zip(*pieces)))

    def _pack(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Contiguous float32 [K, N] -> packed [N, K/block, block*bits/8], scales [N, K/block], zero points [N, ...]."""
        k, n = weight.shape
        blocks = -(-k // self.block_size)
        packed = np.zeros((n, blocks, self.block_size * self.bits // 8), np.uint8)
        scales = np.zeros((n, blocks), np.float32)
        zero_points = np.zeros((n, -(-blocks * self.bits // 8)), np.uint8)
        _QUANTIZERS[self.bits](packed, weight, scales, zero_points, self.block_size, n, k, self.symmetric)
        return packed, scales, zero_points

    def repack(self, name: str, q: np.ndarray, zeros: np.ndarray, scales: np.ndarray) -> dict[str, np.ndarray]:
        """Integers already chosen (an AWQ layer) -> the initializers of its MatMulNBits node, by name.

        ``q`` uint8 [K, N] of values 0..2^bits-1, ``zeros`` uint8 [K/block, N] (one per block of
        ``block_size`` input rows and output column), ``scales`` [K/block, N]; the weight they
        stand for is (q - zero) * scale, exactly as the node computes it."""
        k, n = q.shape
        blocks = zeros.shape[0]
        if self.symmetric or k != blocks * self.block_size or zeros.shape != scales.shape or zeros.shape[1] != n:
            raise ValueError(f"{name}: integers [{k}, {n}] with zero points {list(zeros.shape)} and scales "
                             f"{list(scales.shape)} do not fit asymmetric blocks of {self.block_size}")
        return self._from_integers(name, q, zeros, scales.astype(np.float32))

    def _from_integers(self, name: str, q: np.ndarray, zeros: np.ndarray, scales: np.ndarray
                       ) -> dict[str, np.ndarray]:
        """Integers [K, N], zero points and float32 scales [blocks, N] -> this form's initializers."""
        (k, n), blocks = q.shape, zeros.shape[0]
        packed = _pack_along_last(np.ascontiguousarray(q.T).reshape(n, blocks, self.block_size), self.bits)
        # an odd number of blocks leaves a nibble unused: ONNX Runtime's quantizer fills it with the
        # operator's default zero point, and so does this, so that equal integers give equal bytes
        zero_points = _pack_along_last(np.ascontiguousarray(zeros.T), self.bits, pad=2 ** (self.bits - 1))
        return self._from_nbits(name, k, n, packed, scales.T, zero_points)

    def _from_nbits(self, name: str, k: int, n: int, packed: np.ndarray, scales: np.ndarray,
                    zero_points: np.ndarray) -> dict[str, np.ndarray]:
        """MatMulNBits' arrays (B [N, blocks, bytes], scales [N, blocks], zero points [N, bytes]) -> this form's
        initializers by name; records [K, N] of ``name``."""
        self.shapes[name] = (k, n)
        arrays = {name + _PACKED: packed, name + _SCALES: np.ascontiguousarray(scales).reshape(-1)}
        if not self.symmetric:
            arrays[name + _ZERO_POINTS] = zero_points.reshape(-1)
        return arrays

    def packed_as(self, initializer: str) -> tuple[int, list[int]] | None:
        """How ``ExternalData.add`` stores an initializer this form made (None: as its numpy dtype)."""
        return None

    def matmul(self, g: GraphBuilder, x: str, name: str) -> str:
        """x @ W for a weight quantized by :meth:`quantize`."""
        k, n = self.shapes[name]
        inputs = [x, g.weight(name + _PACKED), g.weight(name + _SCALES)]
        if not self.symmetric:
            inputs.append(g.weight(name + _ZERO_POINTS))
        return g.op("MatMulNBits", *inputs, domain=MS_DOMAIN, K=k, N=n, bits=self.bits,
                    block_size=self.block_size, accuracy_level=self.accuracy_level, hint="matmul_nbits")

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest records of this graph's weights (see :func:`rexedge.runtime.manifest.weights_entry`)."""
        return schema.weights_entry(self.weights, op=self.op, bits=self.bits, block_size=self.block_size,
                                    symmetric=self.symmetric, accuracy_level=self.accuracy_level,
                                    quantized=sorted(self.shapes), origin=self.origin)


def _pack_along_last(values: np.ndarray, bits: int, pad: int = 0) -> np.ndarray:
    """uint8 values of ``bits`` bits -> bytes along the last axis, the first value in the low bits (a byte
    per value for 8 bits; for 4 bits two per byte, an odd count padded with a ``pad`` nibble)."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.full(values.shape[:-1] + (1,), pad, np.uint8)], axis=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_along_last(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`_pack_along_last`: bytes -> ``count`` uint8 values along the last axis."""
    if bits == 8:
        return packed[..., :count]
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return values[..., :count]
