"""Triton kernels, each beside its torch reference.

- :mod:`rexedge.kernels.restricted_head`: logits of allowed rows of the tied embedding,
  repetition penalty, greedy / sampled choice and the chosen token's probability, without
  the logits leaving the device (coordinate, choice and full-vocabulary steps).
- :mod:`rexedge.kernels.decode_attention`: M-RoPE + KV-cache append + split-context
  grouped-query attention for one (or a few) new tokens (flash-decoding).
- :mod:`rexedge.kernels.rmsnorm`: residual add fused with the RMSNorm after it (one launch
  instead of up to nine per norm at decode time).

tests/test_kernel_compile.py compiles every launch the launchers make for sm_90 and sm_87
without a GPU, which the interpreter cannot check (types, block shapes, shared memory).

Submodules import triton; this package file does not, so the error type is importable
without it. On a CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before import).
The kernels stand alone: they import nothing of the runtime (their error is a ValueError of
their own, which the runtime's callers pass on).
"""

from typing import Callable


class KernelInputError(ValueError):
    """Tensors handed to a kernel launcher that do not have the shapes, strides, dtypes or devices it needs."""


def input_check(kernel: str) -> Callable[[bool, str], None]:
    """A launcher's check: ``check(cond, message)`` raises KernelInputError naming ``kernel`` when ``cond`` fails."""

    def check(cond: bool, message: str) -> None:
        if not cond:
            raise KernelInputError(f"{kernel}: {message}")

    return check


__all__ = ["KernelInputError", "input_check"]
