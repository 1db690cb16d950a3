"""Residual add + RMSNorm in one pass: ``x += delta; out = weight * rmsnorm(x)``.

Why a kernel: at decode time a row is one token (H = 2,048 for Rex-Omni 3B), so each
norm is latency, not bandwidth: the model's RMSNorm in plain torch is up to eight small
kernels in bf16 (cast, square, mean, + eps, rsqrt, multiply, cast back, scale; counted with
a dispatch mode) and the residual add one more. Twice per layer over 36 layers that is
~600 launches in a decode step whose weights take ~2 ms to read. Here it is one launch: per row, reads x, delta and the
weight and writes x and out: 5 * H * 2 bytes (20 KB at H = 2,048, fp16/bf16).

Rounding follows :class:`rexedge.runtime.model.compact.RMSNorm` exactly: the sum is rounded to x's
dtype before it is normalised, the normalised row is rounded to x's dtype before it is
scaled, and the scale is rounded once more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rexedge.kernels import input_check


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, stride_x,                  # [M, H] residual stream, updated in place when HAS_DELTA
    delta_ptr, stride_d,              # [M, H] what the layer adds to it
    weight_ptr,                       # [H]
    out_ptr, stride_o,                # [M, H] normalised and scaled
    H, eps,
    HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    m = h < H
    x = tl.load(x_ptr + row * stride_x + h, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row * stride_d + h, mask=m, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * stride_x + h, x, mask=m)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / H + eps)
    normed = (x32 * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + h, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + h, (w * normed).to(out_ptr.dtype.element_ty), mask=m)


_check = input_check("add_rms_norm")


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``x += delta`` (in place, skipped when ``delta`` is None), then return ``weight * rmsnorm(x)``.

    ``x``, ``delta``, ``out`` [M, H] with unit stride along H, one dtype (fp32/fp16/bf16);
    ``weight`` [H] of that dtype. ``out`` is written when given (it must not alias ``x``)."""
    _check(x.dim() == 2 and x.stride(1) == 1, f"x must be [M, H] with unit stride along H, got {tuple(x.shape)} "
           f"strides {x.stride()}")
    rows, hidden = x.shape
    _check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x must be fp32/fp16/bf16, got {x.dtype}")
    _check(weight.shape == (hidden,) and weight.dtype == x.dtype and weight.is_contiguous(),
           f"weight must be a contiguous [{hidden}] {x.dtype} tensor, got {weight.dtype} {tuple(weight.shape)}")
    if delta is not None:
        _check(delta.shape == x.shape and delta.stride(1) == 1 and delta.dtype == x.dtype,
               f"delta must be {x.dtype} {tuple(x.shape)} with unit stride along H, got {delta.dtype} "
               f"{tuple(delta.shape)}")
    if out is None:
        out = torch.empty_like(x)
    _check(out.shape == x.shape and out.stride(1) == 1 and out.dtype == x.dtype,
           f"out must be {x.dtype} {tuple(x.shape)} with unit stride along H, got {out.dtype} {tuple(out.shape)}")
    _check(out.data_ptr() != x.data_ptr(), "out must not alias x (x keeps the residual stream)")
    for name, t in (("delta", delta), ("weight", weight), ("out", out)):
        _check(t is None or t.device == x.device, f"{name} is on {t.device if t is not None else None}, x on {x.device}")
    _add_rms_norm_kernel[(rows,)](
        x, x.stride(0), x if delta is None else delta, 0 if delta is None else delta.stride(0), weight,
        out, out.stride(0), hidden, float(eps),
        HAS_DELTA=delta is not None, BLOCK_H=triton.next_power_of_2(hidden),
    )
    return out


# --------------------------------------------------------------------------- torch reference


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """The residual add and RMSNorm in plain torch (the compact model's RMSNorm; tests check the two agree),
    updating ``x`` in place."""
    if delta is not None:
        x.copy_(x + delta)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
