"""Decode attention: M-RoPE, KV-cache append and split-context GQA for T new tokens (flash-decoding).

Shapes (one decoder layer): new q [B, T, Hq, D], new k / v [B, T, KVH, D] (before rotary),
cos / sin [B, T, D] (M-RoPE, already mixed from the three position streams), caches
[B, KVH, S_max, D] written in place at slots ``cache_len[b] + t``, ``cache_len`` [B]
int32 on the device (tokens already cached, so a CUDA graph replays with a new length
without re-capture). Query t attends to slots ``0 .. cache_len[b] + t``; query head h
uses KV head ``h // (Hq / KVH)`` (as ``scaled_dot_product_attention(enable_gqa=True)``).

Three launches:
1. ``_rotary_append_kernel`` (B*T x (Hq + KVH) programs): rotates q into an fp32 scratch
   and k into the cache, copies v into the cache: reads/writes (Hq + 2 KVH) D values per token.
2. ``_split_attention_kernel`` (B*KVH x chunks x row blocks programs): each program takes one
   chunk of the context (whole 64-slot tiles, at most 64 chunks) of one KV head and up to
   64 query rows of its group (G*T rows: 8 for Rex-Omni at T = 1), so each cached k/v
   element is read once per step: 2 * KVH * L * D * bytes per layer (Rex-Omni 3B,
   L = 1,600, fp16: 1.6 MB). It writes an online-softmax partial (max, sum, unnormalised
   output) per query row and chunk; chunks past the current length exit at once.
3. ``_combine_kernel`` (B*T*Hq programs): rescales and sums the partials of the live chunks.
The grid depends only on ``context_bound`` (default S_max), never on the current length.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rexedge.kernels import input_check

BLOCK_S = 64      # cache slots per inner step: one [64, D] k tile and v tile (16 KB each at D = 128, fp16)
MAX_SPLITS = 64   # context chunks per (batch row, KV head); a chunk is a whole number of BLOCK_S tiles
MIN_ROWS = 16     # tl.dot needs at least 16 rows: the G*T query rows of a KV head are padded up to this
MAX_ROWS = 64     # query rows per program; more (long jump-forward appends) take more programs


@triton.jit
def _rotary_append_kernel(
    q_ptr, k_ptr, v_ptr,              # [B, T, Hq, D], [B, T, KVH, D], [B, T, KVH, D] (unit stride along D)
    cos_ptr, sin_ptr,                 # [B, T, D] float32
    q_out_ptr,                        # [B, T, Hq, D] float32, rotated q
    k_cache_ptr, v_cache_ptr,         # [B, KVH, S_max, D]
    cache_len_ptr,                    # [B] int32
    T, HQ, KVH, S_MAX, D,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sc_b, sc_t,
    sqo_b, sqo_t, sqo_h, skc_b, skc_h, skc_s, svc_b, svc_h, svc_s,
    BLOCK_HALF: tl.constexpr,
):
    bt = tl.program_id(0)
    head = tl.program_id(1)
    b = bt // T
    t = bt % T
    half = D // 2
    i = tl.arange(0, BLOCK_HALF)
    m = i < half
    cos_base = cos_ptr + b * sc_b + t * sc_t
    sin_base = sin_ptr + b * sc_b + t * sc_t
    cos1 = tl.load(cos_base + i, mask=m, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_base + half + i, mask=m, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_base + i, mask=m, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_base + half + i, mask=m, other=0.0).to(tl.float32)
    if head < HQ:
        # (the branches name their pointers apart: a variable must keep one type across an if / else)
        q_src = q_ptr + b * sq_b + t * sq_t + head * sq_h
        x1 = tl.load(q_src + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(q_src + half + i, mask=m, other=0.0).to(tl.float32)
        q_dst = q_out_ptr + b * sqo_b + t * sqo_t + head * sqo_h
        # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        tl.store(q_dst + i, x1 * cos1 - x2 * sin1, mask=m)
        tl.store(q_dst + half + i, x2 * cos2 + x1 * sin2, mask=m)
    else:
        kv = head - HQ
        slot = tl.load(cache_len_ptr + b) + t
        k_src = k_ptr + b * sk_b + t * sk_t + kv * sk_h
        x1 = tl.load(k_src + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(k_src + half + i, mask=m, other=0.0).to(tl.float32)
        k_dst = k_cache_ptr + b * skc_b + kv * skc_h + slot.to(tl.int64) * skc_s
        ok = m & ((slot + 0 * i) < S_MAX)   # broadcast the scalar test to the lane mask
        tl.store(k_dst + i, (x1 * cos1 - x2 * sin1).to(k_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(k_dst + half + i, (x2 * cos2 + x1 * sin2).to(k_cache_ptr.dtype.element_ty), mask=ok)
        j = tl.arange(0, 2 * BLOCK_HALF)
        vm = (j < D) & ((slot + 0 * j) < S_MAX)
        value = tl.load(v_ptr + b * sv_b + t * sv_t + kv * sv_h + j, mask=vm, other=0.0)
        tl.store(v_cache_ptr + b * svc_b + kv * svc_h + slot.to(tl.int64) * svc_s + j,
                 value.to(v_cache_ptr.dtype.element_ty), mask=vm)


@triton.jit
def _split_attention_kernel(
    q_ptr,                            # [B, T, Hq, D] float32 rotated q (contiguous)
    k_cache_ptr, v_cache_ptr,         # [B, KVH, S_max, D]
    cache_len_ptr,                    # [B] int32
    part_o_ptr, part_ml_ptr,          # [B, T, Hq, splits, D] float32, [B, T, Hq, splits, 2] float32
    T, HQ, KVH, GROUP, D, NUM_SPLITS, scale,
    skc_b, skc_h, skc_s, svc_b, svc_h, svc_s,
    SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    bk = tl.program_id(0)
    split = tl.program_id(1)
    row_block = tl.program_id(2)
    b = bk // KVH
    kv = bk % KVH
    past = tl.load(cache_len_ptr + b)
    total = past + T
    s_begin = split * SPLIT
    if s_begin < total:
        # query rows: m = g * T + t for head kv * GROUP + g and new token t
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        g = rows // T
        t = rows % T
        row_ok = rows < GROUP * T
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        head = kv * GROUP + g
        q = tl.load(q_ptr + ((b * T + t) * HQ + head)[:, None] * D + d[None, :],
                    mask=row_ok[:, None] & dm[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        s_end = tl.minimum(s_begin + SPLIT, total)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            live = (s < s_end)[:, None] & dm[None, :]
            k = tl.load(k_cache_ptr + b * skc_b + kv * skc_h + s[:, None].to(tl.int64) * skc_s + d[None, :],
                        mask=live, other=0.0)
            v = tl.load(v_cache_ptr + b * svc_b + kv * svc_h + s[:, None].to(tl.int64) * svc_s + d[None, :],
                        mask=live, other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q.to(k.dtype), tl.trans(k))
            visible = (s[None, :] <= past + t[:, None]) & (s < s_end)[None, :] & row_ok[:, None]
            scores = tl.where(visible, scores * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            # rows with nothing visible yet keep m = -inf; subtract 0 instead so exp gives 0, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        part = ((b * T + t) * HQ + head) * NUM_SPLITS + split
        tl.store(part_o_ptr + part[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & dm[None, :])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(
    part_o_ptr, part_ml_ptr, cache_len_ptr, out_ptr,   # out [B, T, Hq, D] (contiguous)
    T, HQ, D, NUM_SPLITS,
    SPLIT: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)            # (b * T + t) * HQ + h
    b = row // (T * HQ)
    live = tl.cdiv(tl.load(cache_len_ptr + b) + T, SPLIT)
    j = tl.arange(0, BLOCK_SPLITS)
    jm = (j < live) & (j < NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    mx = tl.load(part_ml_ptr + (row * NUM_SPLITS + j) * 2, mask=jm, other=float("-inf"))
    sm = tl.load(part_ml_ptr + (row * NUM_SPLITS + j) * 2 + 1, mask=jm, other=0.0)
    top = tl.max(mx, axis=0)          # split 0 always sees slot 0, so top is finite
    w = tl.where(jm, tl.exp(mx - top), 0.0)
    o = tl.load(part_o_ptr + (row * NUM_SPLITS + j)[:, None] * D + d[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
    acc = tl.sum(o * w[:, None], axis=0) / tl.sum(w * sm, axis=0)
    tl.store(out_ptr + row * D + d, acc.to(out_ptr.dtype.element_ty), mask=dm)


_check = input_check("decode_attention")


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    out: torch.Tensor | None = None,
    context_bound: int | None = None,
) -> torch.Tensor:
    """Append the T new tokens' rotated k and v to the caches and attend; returns [B, T, Hq, D] in q's dtype.

    ``context_bound`` (>= cache_len + T for every row, default S_max) sizes the grid; keep it
    fixed across a captured graph's replays. Slots beyond S_max are neither written nor read:
    the caller checks capacity (the backends do, before each step)."""
    _check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, f"q, k, v must be 4-D, got {q.dim()}, {k.dim()}, {v.dim()}")
    batch, tokens, heads, dim = q.shape
    _check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
           f"k_cache and v_cache must be [B, KVH, S_max, D] of one shape, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    _, kv_heads, s_max, _ = k_cache.shape
    _check(k_cache.shape[0] == batch and k_cache.shape[3] == dim, f"caches {tuple(k_cache.shape)} do not fit q {tuple(q.shape)}")
    _check(k.shape == (batch, tokens, kv_heads, dim) and v.shape == k.shape,
           f"k and v must be {(batch, tokens, kv_heads, dim)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    _check(heads % kv_heads == 0, f"query heads {heads} must be a multiple of KV heads {kv_heads}")
    _check(dim % 2 == 0 and dim >= 16, f"head_dim must be even and >= 16, got {dim}")
    _check(cos.shape == (batch, tokens, dim) and sin.shape == cos.shape,
           f"cos and sin must be {(batch, tokens, dim)}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    _check(cache_len.shape == (batch,) and cache_len.dtype == torch.int32, f"cache_len must be [{batch}] int32, got "
           f"{cache_len.dtype} {tuple(cache_len.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check(t.stride(-1) == 1, f"{name} needs unit stride along its last dimension, got strides {t.stride()}")
        _check(t.device == q.device and cache_len.device == q.device, f"{name} is on {t.device}, q on {q.device}")
        _check(t.dtype in (torch.float32, torch.float16, torch.bfloat16), f"{name} must be fp32/fp16/bf16, got {t.dtype}")
    _check(cos.stride() == sin.stride(), "cos and sin must have the same strides")
    _check(k_cache.dtype == v_cache.dtype and k_cache.stride() == v_cache.stride(), "k_cache and v_cache must match in dtype and strides")
    bound = s_max if context_bound is None else context_bound
    _check(1 <= bound <= s_max, f"context_bound must be in 1..{s_max}, got {bound}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _check(out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype, "out must be contiguous, q's shape and dtype")

    group = heads // kv_heads
    # chunks of whole BLOCK_S tiles, at most MAX_SPLITS of them (the combine kernel loads them in one tile)
    split = BLOCK_S * triton.cdiv(triton.cdiv(bound, BLOCK_S), MAX_SPLITS)
    num_splits = triton.cdiv(bound, split)
    block_m = min(MAX_ROWS, max(MIN_ROWS, triton.next_power_of_2(group * tokens)))
    block_d = triton.next_power_of_2(dim)
    ieee = k_cache.dtype == torch.float32   # fp32 caches: exact fp32 products (no TF32)
    q_rot = torch.empty((batch, tokens, heads, dim), dtype=torch.float32, device=q.device)
    part_o = torch.empty((batch, tokens, heads, num_splits, dim), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((batch, tokens, heads, num_splits, 2), dtype=torch.float32, device=q.device)

    _rotary_append_kernel[(batch * tokens, heads + kv_heads)](
        q, k, v, cos, sin, q_rot, k_cache, v_cache, cache_len,
        tokens, heads, kv_heads, s_max, dim,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos.stride(0), cos.stride(1),
        q_rot.stride(0), q_rot.stride(1), q_rot.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_HALF=block_d // 2,
    )
    _split_attention_kernel[(batch * kv_heads, num_splits, triton.cdiv(group * tokens, block_m))](
        q_rot, k_cache, v_cache, cache_len, part_o, part_ml,
        tokens, heads, kv_heads, group, dim, num_splits, 1.0 / math.sqrt(dim),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        SPLIT=split, BLOCK_S=BLOCK_S, BLOCK_M=block_m, BLOCK_D=block_d, IEEE=ieee,
        # fp32 k/v tiles are 32 KB each: three pipeline stages need 180 KB of shared memory at BLOCK_M = 64,
        # over sm_87's 163 KB per block (Jetson Orin); two need 115 KB
        num_stages=2 if ieee else 3,
    )
    _combine_kernel[(batch * tokens * heads,)](
        part_o, part_ml, cache_len, out, tokens, heads, dim, num_splits,
        SPLIT=split, BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
    )
    return out


# --------------------------------------------------------------------------- torch reference


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding with the two halves of the head dimension as (real, imaginary) parts."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
) -> torch.Tensor:
    """Rotary, cache append and grouped-query attention in plain torch, one batch row at a time (the
    compact model's math; tests/test_kernel_decode_attention.py checks the two agree); writes the caches
    in place like the kernel and returns [B, T, Hq, D] in q's dtype."""
    batch, tokens = q.shape[:2]
    out = torch.empty_like(q)
    for b in range(batch):
        past = int(cache_len[b])
        c, s = cos[b][:, None].float(), sin[b][:, None].float()          # [T, 1, D]
        q_rot = _rotate(q[b].float(), c, s).transpose(0, 1)         # [Hq, T, D]
        k_rot = _rotate(k[b].float(), c, s).transpose(0, 1)         # [KVH, T, D]
        k_cache[b, :, past:past + tokens] = k_rot.to(k_cache.dtype)
        v_cache[b, :, past:past + tokens] = v[b].transpose(0, 1).to(v_cache.dtype)
        total = past + tokens
        allowed = torch.arange(total)[None, :] <= (past + torch.arange(tokens))[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(
            q_rot[None], k_cache[b:b + 1, :, :total].float(), v_cache[b:b + 1, :, :total].float(),
            attn_mask=allowed.to(q.device), enable_gqa=True)
        out[b] = o[0].transpose(0, 1).to(q.dtype)
    return out
