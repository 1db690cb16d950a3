"""The vision encoder as an ONNX graph: one image's patch rows in, image embeddings out.

The inputs are the patch rows and the index arrays of
:class:`rexedge.runtime.vision_layout.VisionLayout` (under the same names), so the number
of patches and windows is dynamic and nothing about an image size is baked into the
graph. The computation follows :class:`rexedge.export.model.VisionEncoder`:
rows are taken into window order, windowed blocks attend inside each window as one
padded batch ``[windows, heads, 64, 64]`` (gather, key mask, gather back: cost grows
with patches x window, never patches^2), the full-attention blocks attend densely over
the image, and after the merger the rows go back to raster order.

Rotary and softmax run in float32 also in an fp16 graph, like the reference.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from rexedge.export.config import RexOmniConfig
from rexedge.export.onnx_graph import (
    GraphBuilder,
    gelu_exact,
    inverse_frequencies,
    linear,
    rms_norm,
    rotary_tables,
    rotate,
    silu,
)

# the vision tower's RMSNorm eps (fixed in the architecture, independent of the text config)
VISION_NORM_EPS = 1e-6

# symbolic dimension names, shared with the manifest's shape ranges
PATCHES, MERGED, WINDOWS = "patches", "image_tokens", "windows"


def window_slots(cfg: RexOmniConfig) -> int:
    """Patch rows per window in the padded batch (64 for Qwen2.5-VL)."""
    return cfg.window_merged ** 2 * cfg.merge_unit


def _rotary(g: GraphBuilder, cfg: RexOmniConfig) -> tuple[str, str]:
    """cos / sign-folded sin [N, 1, head_dim] (float32) for the window-ordered rows."""
    inv_freq = g.const(inverse_frequencies(cfg.vision_head_dim // 2, cfg.vision_rope_theta), "vision_inv_freq")
    positions = g.op("Cast", g.op("Gather", "rotary_pos", "patch_order", axis=0), to=TensorProto.FLOAT)  # [N,2]
    angles = g.op("Mul", g.op("Unsqueeze", positions, g.const([-1], dtype=np.int64)), inv_freq)  # [N,2,hd/4]
    angles = g.op("Reshape", angles, g.const([0, -1], dtype=np.int64))  # [N, hd/2]: row freqs, then col freqs
    cos, sin_signed = rotary_tables(g, angles, TensorProto.FLOAT)
    head_axis = g.const([1], dtype=np.int64)
    return g.op("Unsqueeze", cos, head_axis), g.op("Unsqueeze", sin_signed, head_axis)


def _rotate_f32(g: GraphBuilder, x: str, cos: str, sin_signed: str, head_dim: int, fp16: bool) -> str:
    if not fp16:
        return rotate(g, x, cos, sin_signed, head_dim)
    rotated = rotate(g, g.op("Cast", x, to=TensorProto.FLOAT), cos, sin_signed, head_dim)
    return g.op("Cast", rotated, to=TensorProto.FLOAT16)


def _softmax_f32(g: GraphBuilder, scores: str, fp16: bool) -> str:
    if not fp16:
        return g.op("Softmax", scores, axis=-1)
    probs = g.op("Softmax", g.op("Cast", scores, to=TensorProto.FLOAT), axis=-1)
    return g.op("Cast", probs, to=TensorProto.FLOAT16)


def _dense_attention(g: GraphBuilder, q: str, k: str, v: str, fp16: bool) -> str:
    """[N, heads, hd] each -> [N, heads, hd]; every patch attends to every patch."""
    qh = g.op("Transpose", q, perm=[1, 0, 2])
    kt = g.op("Transpose", k, perm=[1, 2, 0])
    vh = g.op("Transpose", v, perm=[1, 0, 2])
    probs = _softmax_f32(g, g.op("MatMul", qh, kt, hint="scores"), fp16)
    return g.op("Transpose", g.op("MatMul", probs, vh, hint="context"), perm=[1, 0, 2])


def _windowed_attention(g: GraphBuilder, q: str, k: str, v: str, key_bias: str, dim: int, fp16: bool) -> str:
    """[N, heads, hd] each -> [N, dim]: one batched attention over the padded windows."""
    qw = g.op("Transpose", g.op("Gather", q, "window_gather", axis=0), perm=[0, 2, 1, 3])  # [W,h,P,hd]
    kw = g.op("Transpose", g.op("Gather", k, "window_gather", axis=0), perm=[0, 2, 3, 1])  # [W,h,hd,P]
    vw = g.op("Transpose", g.op("Gather", v, "window_gather", axis=0), perm=[0, 2, 1, 3])  # [W,h,P,hd]
    scores = g.op("Add", g.op("MatMul", qw, kw, hint="scores"), key_bias)
    context = g.op("MatMul", _softmax_f32(g, scores, fp16), vw, hint="context")  # [W,h,P,hd]
    flat = g.op("Reshape", g.op("Transpose", context, perm=[0, 2, 1, 3]), g.const([-1, dim], dtype=np.int64))
    # padding slots hold garbage queries; only real rows come back
    return g.op("Gather", flat, "window_unpad", axis=0)


def build_vision_graph(cfg: RexOmniConfig, weights: dict[str, onnx.TensorProto], precision: str) -> onnx.ModelProto:
    """The vision graph over already-written weights (published names, linear weights [in, out])."""
    fp16 = precision == "fp16"
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    dim, heads, hd = cfg.vision_hidden_size, cfg.vision_num_heads, cfg.vision_head_dim
    slots = window_slots(cfg)
    g = GraphBuilder("rexedge_vision", weights)

    g.input("pixel_patches", TensorProto.FLOAT, [PATCHES, cfg.patch_dim])
    # the other inputs are VisionLayout fields under the same names (the runtime feeds them by name)
    g.input("rotary_pos", TensorProto.INT64, [PATCHES, 2])
    g.input("patch_order", TensorProto.INT64, [PATCHES])
    g.input("reverse_index", TensorProto.INT64, [MERGED])
    g.input("window_gather", TensorProto.INT64, [WINDOWS, slots])
    g.input("window_valid", TensorProto.BOOL, [WINDOWS, slots])
    g.input("window_unpad", TensorProto.INT64, [PATCHES])

    score_dtype = np.float16 if fp16 else np.float32
    # additive key mask [W, 1, 1, P]: 0 on real patches, -inf on padding slots (every
    # window holds at least one real patch, so no softmax row is all -inf)
    key_bias = g.op("Where", "window_valid", g.const(score_dtype(0.0)), g.const(score_dtype(-np.inf)), hint="key_bias")
    key_bias = g.op("Unsqueeze", key_bias, g.const([1, 2], dtype=np.int64))
    cos, sin_signed = _rotary(g, cfg)
    scale = g.const(score_dtype(hd ** -0.5), "scale")

    patches = g.op("Cast", "pixel_patches", to=TensorProto.FLOAT16) if fp16 else "pixel_patches"
    x = g.op("Gather", linear(g, patches, "visual.patch_embed.proj.weight"), "patch_order", axis=0)
    qkv_shape = g.const([0, 3, heads, hd], dtype=np.int64)
    flat = g.const([0, dim], dtype=np.int64)
    full = set(cfg.fullatt_block_indexes)
    for i in range(cfg.vision_depth):
        p = f"visual.blocks.{i}."
        h = rms_norm(g, x, p + "norm1.weight", VISION_NORM_EPS, fp16)
        qkv = g.op("Reshape", linear(g, h, p + "attn.qkv.weight", p + "attn.qkv.bias"), qkv_shape)
        q, k, v = g.op("Split", qkv, g.const([1, 1, 1], dtype=np.int64), axis=1, outputs=3, hint="qkv")
        squeeze = g.const([1], dtype=np.int64)
        q = g.op("Squeeze", q, squeeze)
        k = g.op("Squeeze", k, squeeze)
        v = g.op("Squeeze", v, squeeze)
        q = g.op("Mul", _rotate_f32(g, q, cos, sin_signed, hd, fp16), scale, hint="q_scaled")
        k = _rotate_f32(g, k, cos, sin_signed, hd, fp16)
        if i in full:
            attn = g.op("Reshape", _dense_attention(g, q, k, v, fp16), flat)
        else:
            attn = _windowed_attention(g, q, k, v, key_bias, dim, fp16)
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
    g.output(embeds, "image_embeds", TensorProto.FLOAT, [MERGED, cfg.hidden_size])
    return g.build(f"Rex-Omni vision encoder ({precision})")
