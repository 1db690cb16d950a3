"""The text decoder as an ONNX graph: embeddings + M-RoPE positions + KV cache in, hidden states out.

One graph serves the prefill (T >= 1 new tokens on an empty cache), single decode steps
(T = 1) and appends of a few forced tokens (small T): the cache length is an input, not a
graph property. The embedding lookup and the head stay outside (the runtime does both on
the tied embedding table); the final RMSNorm is inside, so the returned hidden state
feeds the head directly.

M-RoPE cos/sin are computed inside the graph from the 3-stream ``position_ids`` once per
forward and shared by every layer: angles = position(stream) x inv_freq, with the
rotary half-dimension split into ``mrope_section`` parts taken from streams 0, 1, 2.

Flavours differ only in how attention and the KV cache are expressed:
- ``ort``: com.microsoft GroupQueryAttention on a max-length KV buffer per layer that is
  both ``past_*`` input and ``present_*`` output. The runtime binds one OrtValue to both
  with IOBinding, so new keys/values are written in place and nothing is copied per step.
  ``seqlens_k`` = total length - 1 (the index of the last valid key, per the operator's
  contract; checked for appends of T > 1 too) and ``total_sequence_length`` = cache
  length + T.
- ``trt``: standard ONNX operators only (what TensorRT's ONNX parser takes without
  plugins; see :mod:`rexedge.export.tensorrt.ops`). TensorRT has no in-place cache without a
  plugin, so each layer's cache goes in as ``past_key_i`` [B, KVH, P, D] and comes back
  as ``present_key_i`` [B, KVH, P+T, D] (Concat). Attention is grouped without copying
  keys per query head: q is viewed as [B, KVH, G, T, D] against keys [B, KVH, 1, D, P+T],
  scores and softmax in float32, causal mask from P and T (Range / Greater / Where).
  Every row shares P (the Concat), so rows of a batch that hold different numbers of tokens
  keep holes in their cache: ``key_valid`` [B, P+T] (bool) says which keys row b attends to,
  on top of the causal mask. Batch 1 passes all true (the same outputs as a causal mask
  alone); the runtime's batched bookkeeping is in :mod:`rexedge.runtime.backends.trt_slots`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto

from rexedge.export.onnx.graph import (
    MS_DOMAIN,
    OPSET,
    GraphBuilder,
    inverse_frequencies,
    linear,
    rms_norm,
    rotary_tables,
    rotate,
    silu,
)
from rexedge.export.onnx.nbits import NBitsWeights
from rexedge.runtime import manifest as schema
from rexedge.runtime.config import RexOmniConfig

# symbolic dimension names, shared with the manifest's shape ranges
BATCH, TOKENS, KV_CAPACITY = schema.BATCH_DIM, "tokens", "kv_capacity"
PAST, PRESENT = "past_length", "present_length"  # trt flavour: cache in (P) and out (P + T)


@dataclass(frozen=True)
class _Flavour:
    name: str
    declare_cache: Callable[[GraphBuilder, RexOmniConfig, int], None]
    attention: Callable[[GraphBuilder, RexOmniConfig, int, str, str, str, int], str]
    extra_opsets: tuple[tuple[str, int], ...]
    present_length: str  # the symbolic length of the present_* outputs


def _ort_declare_cache(g: GraphBuilder, cfg: RexOmniConfig, kv_type: int) -> None:
    g.input(schema.SEQLENS_K, TensorProto.INT32, [BATCH])
    g.input(schema.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [])
    shape = [BATCH, cfg.num_key_value_heads, KV_CAPACITY, cfg.head_dim]
    for i in range(cfg.num_hidden_layers):
        g.input(schema.past("key", i), kv_type, shape)
        g.input(schema.past("value", i), kv_type, shape)


def _ort_attention(g: GraphBuilder, cfg: RexOmniConfig, layer: int, q: str, k: str, v: str, elem: int) -> str:
    """q [B,T,NH*D], k/v [B,T,KVH*D] (rotary applied) -> attention output [B,T,NH*D]."""
    out, _, _ = g.op(
        "GroupQueryAttention", q, k, v, schema.past("key", layer), schema.past("value", layer),
        schema.SEQLENS_K, schema.TOTAL_SEQUENCE_LENGTH,
        outputs=[f"attn_{layer}", schema.present("key", layer), schema.present("value", layer)], domain=MS_DOMAIN,
        num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads,
        scale=float(cfg.head_dim ** -0.5), hint=f"gqa_{layer}",
    )
    return out


def _trt_declare_cache(g: GraphBuilder, cfg: RexOmniConfig, kv_type: int) -> None:
    shape = [BATCH, cfg.num_key_value_heads, PAST, cfg.head_dim]
    for i in range(cfg.num_hidden_layers):
        g.input(schema.past("key", i), kv_type, shape)
        g.input(schema.past("value", i), kv_type, shape)
    g.input(schema.KEY_VALID, TensorProto.BOOL, [BATCH, PRESENT])
    _trt_key_mask(g)


_MASK = "key_mask"


def _trt_key_mask(g: GraphBuilder) -> None:
    """``key_mask`` [B, 1, 1, T, P+T] bool, true where row b's query t must not see key j: j lies after the
    query (j > P + t) or ``key_valid[b, j]`` is false (a hole of that row); once per forward."""
    past = g.op("Gather", g.op("Shape", schema.past("key", 0)), g.const(2, dtype=np.int64), axis=0, hint="past_len")
    tokens = g.op("Gather", g.op("Shape", schema.INPUTS_EMBEDS), g.const(1, dtype=np.int64), axis=0, hint="new_len")
    one = g.const(1, dtype=np.int64)
    keys = g.op("Range", g.const(0, dtype=np.int64), g.op("Add", past, tokens), one, hint="key_pos")
    queries = g.op("Range", past, g.op("Add", past, tokens), one, hint="query_pos")
    causal = g.op("Greater", g.op("Unsqueeze", keys, g.const([0], dtype=np.int64)),
                  g.op("Unsqueeze", queries, g.const([1], dtype=np.int64)), hint="causal")  # [T, P+T]
    holes = g.op("Unsqueeze", g.op("Not", schema.KEY_VALID), g.const([1, 2, 3], dtype=np.int64), hint="holes")
    g.op("Or", g.op("Unsqueeze", causal, g.const([0, 1, 2], dtype=np.int64)), holes, outputs=[_MASK])


def _trt_attention(g: GraphBuilder, cfg: RexOmniConfig, layer: int, q: str, k: str, v: str, elem: int) -> str:
    """q [B,T,NH*D], k/v [B,T,KVH*D] (rotary applied) -> attention output [B,T,NH*D]; appends to the cache."""
    kvh, d, groups = cfg.num_key_value_heads, cfg.head_dim, cfg.num_kv_groups
    kv_shape = g.const([0, 0, kvh, d], dtype=np.int64)
    new_k = g.op("Transpose", g.op("Reshape", k, kv_shape), perm=[0, 2, 1, 3])  # [B,KVH,T,D]
    new_v = g.op("Transpose", g.op("Reshape", v, kv_shape), perm=[0, 2, 1, 3])
    keys = g.op("Concat", schema.past("key", layer), new_k, axis=2, outputs=[schema.present("key", layer)])
    values = g.op("Concat", schema.past("value", layer), new_v, axis=2, outputs=[schema.present("value", layer)])
    # query head h = kv_head * G + g reads kv head h // G (repeat_kv order)
    qg = g.op("Transpose", g.op("Reshape", q, g.const([0, 0, kvh, groups, d], dtype=np.int64)),
              perm=[0, 2, 3, 1, 4])  # [B,KVH,G,T,D]
    axis2 = g.const([2], dtype=np.int64)
    kt = g.op("Unsqueeze", g.op("Transpose", keys, perm=[0, 1, 3, 2]), axis2)  # [B,KVH,1,D,S]
    scores = g.op("MatMul", qg, kt, hint="scores")  # [B,KVH,G,T,S]
    if elem == TensorProto.FLOAT16:
        scores = g.op("Cast", scores, to=TensorProto.FLOAT)
    scores = g.op("Mul", scores, g.const(np.float32(d ** -0.5)), hint="scaled")
    scores = g.op("Where", _MASK, g.const(np.float32(-np.inf)), scores, hint="masked")
    probs = g.op("Softmax", scores, axis=-1)
    if elem == TensorProto.FLOAT16:
        probs = g.op("Cast", probs, to=TensorProto.FLOAT16)
    context = g.op("MatMul", probs, g.op("Unsqueeze", values, axis2), hint="context")  # [B,KVH,G,T,D]
    context = g.op("Transpose", context, perm=[0, 3, 1, 2, 4])  # [B,T,KVH,G,D]
    return g.op("Reshape", context, g.const([0, 0, -1], dtype=np.int64), hint=f"attn_{layer}")


FLAVOURS: dict[str, _Flavour] = {
    "ort": _Flavour("ort", _ort_declare_cache, _ort_attention, ((MS_DOMAIN, 1),), KV_CAPACITY),
    "trt": _Flavour("trt", _trt_declare_cache, _trt_attention, (), PRESENT),
}


def _flavour(name: str) -> _Flavour:
    try:
        return FLAVOURS[name]
    except KeyError:
        raise ValueError(f"unknown decoder flavour {name!r}; expected one of {sorted(FLAVOURS)}") from None


def _mrope_tables(g: GraphBuilder, cfg: RexOmniConfig, elem_type: int) -> tuple[str, str]:
    """cos / sign-folded sin [B, T, 1, D] from position_ids [3, B, T]."""
    inv_freq = g.const(inverse_frequencies(cfg.head_dim, cfg.rope_theta), "inv_freq")
    positions = g.op("Cast", schema.POSITION_IDS, to=TensorProto.FLOAT)
    angles = g.op("Mul", g.op("Unsqueeze", positions, g.const([-1], dtype=np.int64)), inv_freq)  # [3,B,T,D/2]
    parts, start = [], 0
    for stream, width in enumerate(cfg.mrope_section):
        parts.append(g.op("Slice", angles, g.const([stream, start], dtype=np.int64),
                          g.const([stream + 1, start + width], dtype=np.int64), g.const([0, 3], dtype=np.int64),
                          hint=f"mrope_{stream}"))
        start += width
    selected = g.op("Squeeze", g.op("Concat", *parts, axis=-1), g.const([0], dtype=np.int64))  # [B,T,D/2]
    cos, sin_signed = rotary_tables(g, selected, elem_type)
    head_axis = g.const([2], dtype=np.int64)
    return g.op("Unsqueeze", cos, head_axis), g.op("Unsqueeze", sin_signed, head_axis)


def build_decoder_graph(cfg: RexOmniConfig, weights: dict[str, onnx.TensorProto], precision: str,
                        flavour: str = "ort", nbits: NBitsWeights | None = None) -> onnx.ModelProto:
    """The decoder graph over already-written weights (published names, linear weights [in, out]).

    ``nbits``: the linear weights it quantized are its nodes (MatMulNBits in the ort flavour, blocked
    DequantizeLinear + MatMul in the trt flavour: :mod:`rexedge.export.onnx.blocked_dq`)."""
    fl = _flavour(flavour)
    fp16 = precision == "fp16"
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    nh, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = GraphBuilder(f"rexedge_decoder_{flavour}", weights, opset=nbits.opset if nbits is not None else OPSET)

    g.input(schema.INPUTS_EMBEDS, TensorProto.FLOAT, [BATCH, TOKENS, cfg.hidden_size])
    g.input(schema.POSITION_IDS, TensorProto.INT64, [3, BATCH, TOKENS])
    fl.declare_cache(g, cfg, elem)

    cos, sin_signed = _mrope_tables(g, cfg, elem)
    x = g.op("Cast", schema.INPUTS_EMBEDS, to=TensorProto.FLOAT16) if fp16 else schema.INPUTS_EMBEDS
    q_shape = g.const([0, 0, nh, d], dtype=np.int64)
    kv_shape = g.const([0, 0, kvh, d], dtype=np.int64)
    flat_shape = g.const([0, 0, -1], dtype=np.int64)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms_norm(g, x, p + "input_layernorm.weight", cfg.rms_norm_eps, fp16)
        q = g.op("Reshape", linear(g, h, p + "self_attn.q_proj.weight", p + "self_attn.q_proj.bias", nbits), q_shape)
        k = g.op("Reshape", linear(g, h, p + "self_attn.k_proj.weight", p + "self_attn.k_proj.bias", nbits), kv_shape)
        v = linear(g, h, p + "self_attn.v_proj.weight", p + "self_attn.v_proj.bias", nbits)
        q = g.op("Reshape", rotate(g, q, cos, sin_signed, d), flat_shape)
        k = g.op("Reshape", rotate(g, k, cos, sin_signed, d), flat_shape)
        attn = fl.attention(g, cfg, i, q, k, v, elem)
        x = g.op("Add", x, linear(g, attn, p + "self_attn.o_proj.weight", nbits=nbits), hint="residual")
        h = rms_norm(g, x, p + "post_attention_layernorm.weight", cfg.rms_norm_eps, fp16)
        gate = silu(g, linear(g, h, p + "mlp.gate_proj.weight", nbits=nbits))
        up = linear(g, h, p + "mlp.up_proj.weight", nbits=nbits)
        x = g.op("Add", x, linear(g, g.op("Mul", gate, up), p + "mlp.down_proj.weight", nbits=nbits), hint="residual")
    hidden = rms_norm(g, x, "model.norm.weight", cfg.rms_norm_eps, fp16)
    if fp16:
        hidden = g.op("Cast", hidden, to=TensorProto.FLOAT)
    g.output(hidden, schema.HIDDEN_STATES, TensorProto.FLOAT, [BATCH, TOKENS, cfg.hidden_size])
    kv_out_shape = [BATCH, kvh, fl.present_length, d]
    for i in range(cfg.num_hidden_layers):
        g.output(schema.present("key", i), schema.present("key", i), elem, kv_out_shape)
        g.output(schema.present("value", i), schema.present("value", i), elem, kv_out_shape)
    return g.build(f"Rex-Omni text decoder ({precision}, flavour {flavour})", fl.extra_opsets)
