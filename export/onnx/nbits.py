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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ONNX Runtime's block quantizers, the routines under its MatMulNBitsQuantizer: called directly
# because the quantizer's module imports onnx_ir, which we would need for nothing else
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from rexedge.export.onnx.graph import MS_DOMAIN, GraphBuilder
from rexedge.runtime import manifest as schema

BITS = {"int4": 4, "int8": 8}
BLOCK_SIZE = 128
SYMMETRIC = False
ACCURACY_LEVEL = 4

# the decoder's linear weights that become MatMulNBits (published names)
_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")

_QUANTIZERS = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}

# initializer names beside the weight's published name
_PACKED, _SCALES, _ZERO_POINTS = ".nbits", ".scales", ".zero_points"


@dataclass
class NBitsWeights:
    """The quantization settings of one graph, and the [K, N] of every weight quantized so far."""

    weights: str                      # "int4" or "int8"
    block_size: int = BLOCK_SIZE
    symmetric: bool = SYMMETRIC
    accuracy_level: int = ACCURACY_LEVEL
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights not in BITS:
            raise ValueError(f"weights {self.weights!r}: expected one of {sorted(BITS)}")

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
        self.shapes[name] = (k, n)
        return self._named(name, *self._pack(np.ascontiguousarray(weight, dtype=np.float32)))

    def quantize_rows(self, name: str, rows: np.ndarray, chunk: int = 8192) -> dict[str, np.ndarray]:
        """float [N, K] (a table whose rows are the product's output columns: the tied embedding as the
        head, logits = hidden @ rows.T) -> the initializers of its MatMulNBits node, by name.

        Every output column is quantized on its own, so the table is quantized ``chunk`` rows at a
        time and the pieces stacked: a transposed float copy of the whole table is never made."""
        n, k = rows.shape
        pieces = [self._pack(np.ascontiguousarray(rows[i:i + chunk].T, dtype=np.float32)) for i in range(0, n, chunk)]
        self.shapes[name] = (k, n)
        return self._named(name, *(np.concatenate(parts) for parts in zip(*pieces)))

    def _pack(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Contiguous float32 [K, N] -> packed [N, K/block, block*bits/8], scales [N, K/block], zero points [N, ...]."""
        k, n = weight.shape
        blocks = -(-k // self.block_size)
        packed = np.zeros((n, blocks, self.block_size * self.bits // 8), np.uint8)
        scales = np.zeros((n, blocks), np.float32)
        zero_points = np.zeros((n, -(-blocks * self.bits // 8)), np.uint8)
        _QUANTIZERS[self.bits](packed, weight, scales, zero_points, self.block_size, n, k, self.symmetric)
        return packed, scales, zero_points

    def _named(self, name: str, packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray
               ) -> dict[str, np.ndarray]:
        arrays = {name + _PACKED: packed, name + _SCALES: scales.reshape(-1)}
        if not self.symmetric:
            arrays[name + _ZERO_POINTS] = zero_points.reshape(-1)
        return arrays

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
        return schema.weights_entry(self.weights, op="MatMulNBits", bits=self.bits, block_size=self.block_size,
                                    symmetric=self.symmetric, accuracy_level=self.accuracy_level,
                                    quantized=sorted(self.shapes))
