"""Triton kernels, each beside its torch reference.

- :mod:`rexedge.kernels.restricted_head`: logits of allowed rows of the tied embedding,
  repetition penalty, greedy / sampled choice and the chosen token's probability, without
  the logits leaving the device (coordinate, choice and full-vocabulary steps).
- :mod:`rexedge.kernels.decode_attention`: M-RoPE + KV-cache append + split-context
  grouped-query attention for one (or a few) new tokens (flash-decoding).

Submodules import triton; this package file does not, so the error type is importable
without it. On a CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before import).
"""

from rexedge.runtime.errors import RexEdgeError


class KernelInputError(RexEdgeError, ValueError):
    """Tensors handed to a kernel launcher that do not have the shapes, strides, dtypes or devices it needs."""


__all__ = ["KernelInputError"]
