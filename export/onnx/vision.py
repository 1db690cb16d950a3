"""The vision encoder as an ONNX graph: one image's patch rows in, image embeddings out.

The inputs are the patch rows and the index arrays of
:class:`rexedge.runtime.request.vision_layout.VisionLayout` (under the same names), so the number
of patches and windows is dynamic and nothing about an image size is baked into the
graph. The computation follows :class:`rexedge.runtime.model.compact.VisionEncoder`:
rows are taken into window order, windowed blocks attend inside each window as one
padded batch ``[windows, heads, 64, 64]`` (gather, key mask, gather back: cost grows
with patches x window, never patches^2), the full-attention blocks attend over
the whole image, and after the merger the rows go back to raster order.

Flavours differ only in how attention is expressed (the decoder's flavour names):
- ``ort``: com.microsoft RotaryEmbedding (one pass over q or k instead of split, concat,
  two products and a sum) and MultiHeadAttention. Full-attention blocks take ONNX
  Runtime's CPU flash-attention path (no mask, no cache): the N x N scores are never
  materialised (cpu-bench preset, 1,479 image tokens: 5,916 patches, 6 heads x 5,916^2
  fp32 = 840 MB per score tensor otherwise). Windowed blocks pass the padded windows as
  the batch with the key mask as ``key_padding_mask``. Both CPU kernels are float32 only,
  so an fp16 graph computes a block's attention in float32 (qkv cast once, the output cast
  back). Measured on that image (2 cores): 0.95 s against 1.27 s for the ``trt``
  formulation on ONNX Runtime, outputs within 2e-6 relative of each other.
- ``trt``: standard ONNX operators only (what TensorRT's parser takes, see
  :mod:`rexedge.export.tensorrt.ops`): MatMul / Softmax / MatMul, dense N x N for the full
  blocks, the padded windows with an additive key mask.

Rotary and softmax run in float32 also in an fp16 graph, like the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto

from rexedge.export.onnx.graph import (
    MS_DOMAIN,
    GraphBuilder,
    gelu_exact,
    inverse_frequencies,
    linear,
    rms_norm,
    rotary_tables,
    rotate,
    silu,
)
from rexedge.runtime import manifest as schema
from rexedge.runtime.config import RexOmniConfig

# the vision tower's RMSNorm eps (fixed in the architecture, independent of the text config)
VISION_NORM_EPS = 1e-6

# symbolic dimension names, shared with the manifest's shape ranges
PATCHES, MERGED, WINDOWS = "patches", "image_tokens", "windows"


def window_slots(cfg: RexOmniConfig) -> int:
    """Patch rows per window in the padded batch (64 for Qwen2.5-VL)."""
    return cfg.window_merged ** 2 * cfg.merge_unit


def _rotary_angles(g: GraphBuilder, cfg: RexOmniConfig) -> str:
    """Rotary angles [N, hd/2] (float32) of the window-ordered rows: row freqs, then col freqs."""
    inv_freq = g.const(inverse_frequencies(cfg.vision_head_dim // 2, cfg.vision_rope_theta), "vision_inv_freq")
    positions = g.op("Cast", g.op("Gather", "rotary_pos", "patch_order", axis=0), to=TensorProto.FLOAT)  # [N,2]
    angles = g.op("Mul", g.op("Unsqueeze", positions, g.const([-1], dtype=np.int64)), inv_freq)  # [N,2,hd/4]
    return g.op("Reshape", angles, g.const([0, -1], dtype=np.int64))


def _softmax_f32(g: GraphBuilder, scores: str, fp16: bool) -> str:
    if not fp16:
        return g.op("Softmax", scores, axis=-1)
    probs = g.op("Softmax", g.op("Cast", scores, to=TensorProto.FLOAT), axis=-1)
    return g.op("Cast", probs, to=TensorProto.FLOAT16)


@dataclass(frozen=True)
class _Shared:
    """What every block's attention shares, made once per forward by the flavour's ``prepare``."""

    heads: int
    head_dim: int
    fp16: bool
    cos: str  # ort: cos_cache [N, hd/2]; trt: cos [N, 1, hd]
    sin: str  # ort: sin_cache [N, hd/2]; trt: sign-folded sin [N, 1, hd]
    window_keys: str  # ort: key_padding_mask [W, P] int32 (1 = real patch); trt: additive key bias [W, 1, 1, P]
    scale: str | float  # ort: the operator's attribute; trt: a constant multiplied into q

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


# ort ---------------------------------------------------------------------------------------


def _ort_prepare(g: GraphBuilder, cfg: RexOmniConfig, fp16: bool, angles: str) -> _Shared:
    mask = g.op("Cast", "window_valid", to=TensorProto.INT32, hint="key_padding_mask")
    cos, sin = g.op("Cos", angles, hint="cos_cache"), g.op("Sin", angles, hint="sin_cache")
    return _Shared(cfg.vision_num_heads, cfg.vision_head_dim, fp16, cos, sin, mask,
                   float(cfg.vision_head_dim ** -0.5))


def _ort_rotate(g: GraphBuilder, sh: _Shared, x: str) -> str:
    """[1, N, dim] -> rotated, rotate-half convention; row n takes row n of the caches (position 0 + n)."""
    rotated = g.op("RotaryEmbedding", x, g.const([0], dtype=np.int64), sh.cos, sh.sin, domain=MS_DOMAIN,
                   num_heads=sh.heads, interleaved=0, hint="rotary")
    return g.declare_type(rotated, TensorProto.FLOAT)


def _mha(g: GraphBuilder, sh: _Shared, q: str, k: str, v: str, key_padding_mask: str | None = None) -> str:
    """q/k/v [B, S, dim] -> [B, S, dim]: com.microsoft MultiHeadAttention, bidirectional."""
    inputs = [q, k, v] + (["", key_padding_mask] if key_padding_mask else [])  # input 3 (bias) unused
    # masked keys get the lowest float32 instead of the default -10000: exactly zero weight like the
    # reference's -inf, whatever the scores' scale (every window holds a real patch, so no row is all masked)
    out = g.op("MultiHeadAttention", *inputs, domain=MS_DOMAIN, num_heads=sh.heads, scale=sh.scale,
               mask_filter_value=float(np.finfo(np.float32).min), hint="mha")
    return g.declare_type(out, TensorProto.FLOAT)


def _ort_attention(g: GraphBuilder, sh: _Shared, qkv: str, full: bool) -> str:
    """qkv [N, 3 dim] -> attention output [N, dim].

    Full blocks: one sequence of N patches, which takes the CPU kernel's flash-attention path
    (no mask, no cache). Windowed blocks: the padded windows as a batch [W, P, dim], padding
    slots masked (the kernel's dense path; a window's scores are P x P)."""
    dim = sh.dim
    if sh.fp16:  # the CPU kernels of both operators are float32 only
        qkv = g.op("Cast", qkv, to=TensorProto.FLOAT)
    q, k, v = g.op("Split", qkv, g.const([dim] * 3, dtype=np.int64), axis=-1, outputs=3, hint="qkv")
    sequence, rows = g.const([1, -1, dim], dtype=np.int64), g.const([-1, dim], dtype=np.int64)
    q = _ort_rotate(g, sh, g.op("Reshape", q, sequence))
    k = _ort_rotate(g, sh, g.op("Reshape", k, sequence))
    if full:
        out = g.op("Reshape", _mha(g, sh, q, k, g.op("Reshape", v, sequence)), rows)
    else:
        qw, kw, vw = (g.op("Gather", g.op("Reshape", x, rows), "window_gather", axis=0) for x in (q, k, v))
        out = g.op("Reshape", _mha(g, sh, qw, kw, vw, sh.window_keys), rows)
        # padding slots hold garbage queries; only real rows come back
        out = g.op("Gather", out, "window_unpad", axis=0)
    return g.op("Cast", out, to=TensorProto.FLOAT16) if sh.fp16 else out


# trt ---------------------------------------------------------------------------------------


def _trt_prepare(g: GraphBuilder, cfg: RexOmniConfig, fp16: bool, angles: str) -> _Shared:
    score_dtype = np.float16 if fp16 else np.float32
    # additive key mask [W, 1, 1, P]: 0 on real patches, -inf on padding slots (every
    # window holds at least one real patch, so no softmax row is all -inf)
    key_bias = g.op("Where", "window_valid", g.const(score_dtype(0.0)), g.const(score_dtype(-np.inf)), hint="key_bias")
    key_bias = g.op("Unsqueeze", key_bias, g.const([1, 2], dtype=np.int64))
    cos, sin_signed = rotary_tables(g, angles, TensorProto.FLOAT)
    head_axis = g.const([1], dtype=np.int64)
    scale = g.const(score_dtype(cfg.vision_head_dim ** -0.5), "scale")
    return _Shared(cfg.vision_num_heads, cfg.vision_head_dim, fp16, g.op("Unsqueeze", cos, head_axis),
                   g.op("Unsqueeze", sin_signed, head_axis), key_bias, scale)


def _trt_rotate(g: GraphBuilder, sh: _Shared, x: str) -> str:
    """[N, heads, hd] -> rotated in float32 (like the reference), back in the graph's type."""
    if not sh.fp16:
        return rotate(g, x, sh.cos, sh.sin, sh.head_dim)
    rotated = rotate(g, g.op("Cast", x, to=TensorProto.FLOAT), sh.cos, sh.sin, sh.head_dim)
    return g.op("Cast", rotated, to=TensorProto.FLOAT16)


def _trt_dense(g: GraphBuilder, sh: _Shared, q: str, k: str, v: str) -> str:
    """[N, heads, hd] each (q scaled) -> [N, heads, hd]; every patch attends to every patch (N x N scores)."""
    qh = g.op("Transpose", q, perm=[1, 0, 2])
    kt = g.op("Transpose", k, perm=[1, 2, 0])
    vh = g.op("Transpose", v, perm=[1, 0, 2])
    probs = _softmax_f32(g, g.op("MatMul", qh, kt, hint="scores"), sh.fp16)
    return g.op("Transpose", g.op("MatMul", probs, vh, hint="context"), perm=[1, 0, 2])


def _trt_windowed(g: GraphBuilder, sh: _Shared, q: str, k: str, v: str) -> str:
    """[N, heads, hd] each (q scaled) -> [N, dim]: one batched attention over the padded windows."""
    qw = g.op("Transpose", g.op("Gather", q, "window_gather", axis=0), perm=[0, 2, 1, 3])  # [W,h,P,hd]
    kw = g.op("Transpose", g.op("Gather", k, "window_gather", axis=0), perm=[0, 2, 3, 1])  # [W,h,hd,P]
    vw = g.op("Transpose", g.op("Gather", v, "window_gather", axis=0), perm=[0, 2, 1, 3])  # [W,h,P,hd]
    scores = g.op("Add", g.op("MatMul", qw, kw, hint="scores"), sh.window_keys)
    context = g.op("MatMul", _softmax_f32(g, scores, sh.fp16), vw, hint="context")  # [W,h,P,hd]
    flat = g.op("Reshape", g.op("Transpose", context, perm=[0, 2, 1, 3]), g.const([-1, sh.dim], dtype=np.int64))
    # padding slots hold garbage queries; only real rows come back
    return g.op("Gather", flat, "window_unpad", axis=0)


def _trt_attention(g: GraphBuilder, sh: _Shared, qkv: str, full: bool) -> str:
    """qkv [N, 3 dim] -> attention output [N, dim], standard operators only."""
    qkv = g.op("Reshape", qkv, g.const([0, 3, sh.heads, sh.head_dim], dtype=np.int64))
    q, k, v = g.op("Split", qkv, g.const([1, 1, 1], dtype=np.int64), axis=1, outputs=3, hint="qkv")
    squeeze = g.const([1], dtype=np.int64)
    q = g.op("Mul", _trt_rotate(g, sh, g.op("Squeeze", q, squeeze)), sh.scale, hint="q_scaled")
    k = _trt_rotate(g, sh, g.op("Squeeze", k, squeeze))
    v = g.op("Squeeze", v, squeeze)
    if full:
        return g.op("Reshape", _trt_dense(g, sh, q, k, v), g.const([-1, sh.dim], dtype=np.int64))
    return _trt_windowed(g, sh, q, k, v)


@dataclass(frozen=True)
class _Flavour:
    name: str
    prepare: Callable[[GraphBuilder, RexOmniConfig, bool, str], _Shared]
    attention: Callable[[GraphBuilder, _Shared, str, bool], str]  # (qkv [N, 3 dim], full block?) -> [N, dim]
    extra_opsets: tuple[tuple[str, int], ...]


FLAVOURS: dict[str, _Flavour] = {
    "ort": _Flavour("ort", _ort_prepare, _ort_attention, ((MS_DOMAIN, 1),)),
    "trt": _Flavour("trt", _trt_prepare, _trt_attention, ()),
}


def build_vision_graph(cfg: RexOmniConfig, weights: dict[str, onnx.TensorProto], precision: str,
                       flavour: str = "ort") -> onnx.ModelProto:
    """The vision graph over already-written weights (published names, linear weights [in, out])."""
    try:
        fl = FLAVOURS[flavour]
    except KeyError:
        raise ValueError(f"unknown vision flavour {flavour!r}; expected one of {sorted(FLAVOURS)}") from None
    fp16 = precision == "fp16"
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    dim = cfg.vision_hidden_size
    slots = window_slots(cfg)
    g = GraphBuilder(f"rexedge_vision_{flavour}", weights)

    g.input(schema.PIXEL_PATCHES, TensorProto.FLOAT, [PATCHES, cfg.patch_dim])
    # the other inputs are VisionLayout fields under the same names (the runtime feeds them by name)
    g.input("rotary_pos", TensorProto.INT64, [PATCHES, 2])
    g.input("patch_order", TensorProto.INT64, [PATCHES])
    g.input("reverse_index", TensorProto.INT64, [MERGED])
    g.input("window_gather", TensorProto.INT64, [WINDOWS, slots])
    g.input("window_valid", TensorProto.BOOL, [WINDOWS, slots])
    g.input("window_unpad", TensorProto.INT64, [PATCHES])

    shared = fl.prepare(g, cfg, fp16, _rotary_angles(g, cfg))

    patches = g.op("Cast", schema.PIXEL_PATCHES, to=TensorProto.FLOAT16) if fp16 else schema.PIXEL_PATCHES
    x = g.op("Gather", linear(g, patches, "visual.patch_embed.proj.weight"), "patch_order", axis=0)
    full = set(cfg.fullatt_block_indexes)
    for i in range(cfg.vision_depth):
        p = f"visual.blocks.{i}."
        h = rms_norm(g, x, p + "norm1.weight", VISION_NORM_EPS, fp16)
        qkv = linear(g, h, p + "attn.qkv.weight", p + "attn.qkv.bias")
        attn = fl.attention(g, shared, qkv, i in full)
        x = g.op("Add", x, linear(g, attn, p + "attn.proj.weight", p + "attn.proj.bias"), hint="residual")
        h = rms_norm(g, x, p + "norm2.weight", VISION_NORM_EPS, fp16)
        gate = silu(g, linear(g, h, p + "mlp.gate_proj.weight", p + "mlp.gate_proj.bias"))
        up = linear(g, h, p + "mlp.up_proj.weight", p + "mlp.up_proj.bias")
        down = linear(g, g.op("Mul", gate, up), p + "mlp.down_proj.weight", p + "mlp.down_proj.bias")
        x = g.op("Add", x, down, hint="residual")

    h = rms_norm(g, x, "visual.merger.ln_q.weight", VISION_NORM_EPS, fp16)
    h = g.op("Reshape", h, g.const([-1, dim * cfg.merge_unit], dtype=np.int64))
    h = gelu_exact(g, linear(g, h, "visual.merger.mlp.0.weight", "visual.merger.mlp.0.bias"), elem)
    h = linear(g, h, "visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias")
    embeds = g.op("Gather", h, "reverse_index", axis=0)
    if fp16:
        embeds = g.op("Cast", embeds, to=TensorProto.FLOAT)
    g.output(embeds, schema.IMAGE_EMBEDS, TensorProto.FLOAT, [MERGED, cfg.hidden_size])
    return g.build(f"Rex-Omni vision encoder ({precision}, flavour {flavour})", fl.extra_opsets)
