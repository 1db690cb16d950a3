"""Restricted output head: logits of allowed rows only, penalty, choice and confidence on the device.

The allowed rows are a contiguous range of token ids followed by a short id list:
``[start, stop) + extra_ids``. That one shape covers every step of structured decoding:
COORD (the 1,000 coordinate rows, plus a few extra ids), CHOICE (range empty, a few ids)
and FREE / exact mode (the whole vocabulary, no extras). Row ``r`` of the allowed set is
token ``start + r`` for ``r < stop - start``, else ``extra_ids[r - (stop - start)]``.

Semantics are :class:`rexedge.runtime.decode.head.NumpyHead`'s: logits ``E[token] . hidden`` in
fp32; repetition penalty on tokens marked in ``seen`` (positive logits divided, the rest
multiplied); rows marked in ``blocked`` (phrase steps: no coordinate or special token) get
-inf; greedy = first maximal row; the returned probability is the chosen row's
softmax over the allowed rows at temperature 1 after the penalty. Sampling draws
``argmax(logit / T + Gumbel(u))`` from caller-supplied uniforms ``u`` (the Gumbel-max
form of sampling from softmax(logit / T)); top-k / top-p need the whole sorted row, so
for those the kernel writes the penalized logits (``logits_out``) and
:func:`sample_index` finishes on the device.

Pass 1 (``_head_partials_kernel``, grid = row blocks x batch) reads each allowed table
row once: BLOCK_R rows x H elements, e.g. for the full 151,936 x 2,048 fp16 head 622 MB,
for the 1,000 coordinate rows 4 MB; per block it writes 5 numbers (online-softmax max
and sum, best score, its logit, its row). Pass 2 (``_head_reduce_kernel``, one program
per sequence) folds the block partials into the token id and its probability.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rexedge.kernels import input_check

BLOCK_R = 64      # table rows per program
BLOCK_H = 128     # hidden elements per inner step: a [64, 128] tile, 16 KB in fp16


@triton.jit
def _head_partials_kernel(
    hidden_ptr, stride_hb,            # [B, H], unit stride along H
    table_ptr, stride_tv,             # [V, H], unit stride along H
    seen_ptr, stride_sb,              # [B, V] uint8: 1 where the token is in the prompt or output
    blocked_ptr, stride_bb,           # [B, V] uint8: 1 where the token may not be chosen (BLOCKED only)
    ids_ptr,                          # [n - n_range] int64 extra token ids
    noise_ptr, stride_nb,             # [B, n] float32 uniforms in [0, 1) (SAMPLE only)
    logits_ptr, stride_lb,            # [B, n] float32 penalized logits (WRITE_LOGITS only)
    part_ptr, part_idx_ptr,           # [B, NB, 4] float32, [B, NB] int32
    start, n_range, n, H, num_blocks,
    penalty, inv_temperature,
    SAMPLE: tl.constexpr, WRITE_LOGITS: tl.constexpr, BLOCKED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = r < n
    is_extra = valid & (r >= n_range)
    extra = tl.load(ids_ptr + (r - n_range), mask=is_extra, other=0)
    token = tl.where(is_extra, extra, start + r).to(tl.int64)

    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hm = hs < H
        x = tl.load(hidden_ptr + b * stride_hb + hs, mask=hm, other=0.0).to(tl.float32)
        w = tl.load(table_ptr + token[:, None] * stride_tv + hs[None, :], mask=valid[:, None] & hm[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)

    seen = tl.load(seen_ptr + b * stride_sb + token, mask=valid, other=0)
    penalized = tl.where(acc > 0, acc / penalty, acc * penalty)
    logit = tl.where(seen != 0, penalized, acc)
    if BLOCKED:
        is_blocked = tl.load(blocked_ptr + b * stride_bb + token, mask=valid, other=0)
        logit = tl.where(is_blocked != 0, float("-inf"), logit)
    logit = tl.where(valid, logit, float("-inf"))
    if WRITE_LOGITS:
        tl.store(logits_ptr + b * stride_lb + r, logit, mask=valid)

    block_max = tl.max(logit, axis=0)
    # a block may be blocked whole (the coordinate rows at a phrase step): its sum is 0, not exp(-inf + inf)
    block_sum = tl.sum(tl.exp(logit - tl.where(block_max == float("-inf"), 0.0, block_max)), axis=0)
    if SAMPLE:
        u = tl.load(noise_ptr + b * stride_nb + r, mask=valid, other=0.5)
        score = logit * inv_temperature - tl.log(-tl.log(u))
        score = tl.where(valid, score, float("-inf"))
    else:
        score = logit
    best = tl.argmax(score, axis=0, tie_break_left=True)
    best_score = tl.max(score, axis=0)
    best_logit = tl.sum(tl.where(tl.arange(0, BLOCK_R) == best, logit, 0.0), axis=0)

    base = part_ptr + (b * num_blocks + pid) * 4
    tl.store(base + 0, block_max)
    tl.store(base + 1, block_sum)
    tl.store(base + 2, best_score)
    tl.store(base + 3, best_logit)
    tl.store(part_idx_ptr + b * num_blocks + pid, (pid * BLOCK_R + best).to(tl.int32))


@triton.jit
def _head_reduce_kernel(
    part_ptr, part_idx_ptr, ids_ptr,  # partials as written by pass 1; extra ids
    token_ptr, prob_ptr,              # [B] int64, [B] float32
    start, n_range, num_blocks,
    BLOCK_NB: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.arange(0, BLOCK_NB)
    jm = j < num_blocks
    base = part_ptr + (b * num_blocks + j) * 4
    block_max = tl.load(base + 0, mask=jm, other=float("-inf"))
    block_sum = tl.load(base + 1, mask=jm, other=0.0)
    score = tl.load(base + 2, mask=jm, other=float("-inf"))
    logit = tl.load(base + 3, mask=jm, other=0.0)
    row = tl.load(part_idx_ptr + b * num_blocks + j, mask=jm, other=0)

    top = tl.max(block_max, axis=0)
    total = tl.sum(tl.where(jm, block_sum * tl.exp(block_max - top), 0.0), axis=0)
    # blocks are in row order and each reports its first maximum, so the first maximal block is numpy's argmax
    best = tl.argmax(score, axis=0, tie_break_left=True)
    r = tl.sum(tl.where(j == best, row, 0), axis=0)
    chosen_logit = tl.sum(tl.where(j == best, logit, 0.0), axis=0)
    extra = tl.load(ids_ptr + (r - n_range), mask=r >= n_range, other=0)
    token = tl.where(r >= n_range, extra, start + r).to(tl.int64)
    tl.store(token_ptr + b, token)
    tl.store(prob_ptr + b, tl.exp(chosen_logit - top) / total)


_check = input_check("restricted_head")


def restricted_head(
    hidden: torch.Tensor,
    table: torch.Tensor,
    seen: torch.Tensor,
    start: int,
    stop: int,
    extra_ids: torch.Tensor | None = None,
    penalty: float = 1.0,
    temperature: float = 0.0,
    noise: torch.Tensor | None = None,
    blocked: torch.Tensor | None = None,
    token_out: torch.Tensor | None = None,
    prob_out: torch.Tensor | None = None,
    logits_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row of ``hidden`` [B, H] among ``[start, stop) + extra_ids``.

    ``table`` [V, H] (fp32/fp16/bf16, unit stride along H); ``seen`` and ``blocked`` [B, V]
    uint8 or bool (blocked rows are never chosen; at least one allowed row must stay open);
    ``extra_ids`` int64 on the device; ``noise`` [B, n] float32 uniforms, required when
    ``temperature > 0``. Returns (token [B] int64, probability [B] float32), written into
    ``token_out`` / ``prob_out`` when given; ``logits_out`` [B, n] float32 receives the
    penalized logits. Allocates only the small partials buffer (graph-capture safe)."""
    _check(hidden.dim() == 2 and hidden.stride(1) == 1, f"hidden must be [B, H] with unit stride along H, got "
           f"shape {tuple(hidden.shape)} strides {hidden.stride()}")
    _check(table.dim() == 2 and table.stride(1) == 1 and table.shape[1] == hidden.shape[1],
           f"table must be [V, {hidden.shape[1]}] with unit stride along H, got {tuple(table.shape)} strides {table.stride()}")
    for name, t in (("hidden", hidden), ("table", table)):
        _check(t.dtype in (torch.float32, torch.float16, torch.bfloat16), f"{name} must be fp32/fp16/bf16, got {t.dtype}")
    batch, vocab = hidden.shape[0], table.shape[0]
    _check(seen.shape == (batch, vocab) and seen.stride(1) == 1 and seen.dtype in (torch.uint8, torch.bool),
           f"seen must be a [{batch}, {vocab}] uint8/bool mask with unit stride, got {seen.dtype} {tuple(seen.shape)}")
    if blocked is not None:
        _check(blocked.shape == (batch, vocab) and blocked.stride(1) == 1 and blocked.dtype in (torch.uint8, torch.bool),
               f"blocked must be a [{batch}, {vocab}] uint8/bool mask with unit stride, got {blocked.dtype} "
               f"{tuple(blocked.shape)}")
    _check(0 <= start <= stop <= vocab, f"need 0 <= start <= stop <= {vocab}, got start={start} stop={stop}")
    device = hidden.device
    if extra_ids is None:
        extra_ids = torch.zeros(1, dtype=torch.int64, device=device)
        n_extra = 0
    else:
        _check(extra_ids.dim() == 1 and extra_ids.dtype == torch.int64 and extra_ids.is_contiguous(),
               f"extra_ids must be a contiguous 1-D int64 tensor, got {extra_ids.dtype} {tuple(extra_ids.shape)}")
        n_extra = extra_ids.shape[0]
    n_range = stop - start
    n = n_range + n_extra
    _check(n >= 1, "the allowed set is empty (start == stop and no extra_ids)")
    _check(penalty > 0, f"penalty must be > 0, got {penalty}")
    _check(temperature >= 0, f"temperature must be >= 0, got {temperature}")
    sample = temperature > 0
    if sample:
        _check(noise is not None and noise.shape == (batch, n) and noise.dtype == torch.float32 and noise.stride(1) == 1,
               f"sampling needs noise: [{batch}, {n}] float32 uniforms, got "
               f"{None if noise is None else (noise.dtype, tuple(noise.shape))}")
    if logits_out is not None:
        _check(logits_out.shape == (batch, n) and logits_out.dtype == torch.float32 and logits_out.stride(1) == 1,
               f"logits_out must be [{batch}, {n}] float32, got {logits_out.dtype} {tuple(logits_out.shape)}")
    if token_out is None:
        token_out = torch.empty(batch, dtype=torch.int64, device=device)
    if prob_out is None:
        prob_out = torch.empty(batch, dtype=torch.float32, device=device)
    _check(token_out.shape == (batch,) and token_out.dtype == torch.int64, "token_out must be [B] int64")
    _check(prob_out.shape == (batch,) and prob_out.dtype == torch.float32, "prob_out must be [B] float32")
    for name, t in (("table", table), ("seen", seen), ("blocked", blocked), ("extra_ids", extra_ids), ("noise", noise),
                    ("logits_out", logits_out), ("token_out", token_out), ("prob_out", prob_out)):
        _check(t is None or t.device == device, f"{name} is on {t.device if t is not None else None}, hidden on {device}")

    num_blocks = triton.cdiv(n, BLOCK_R)
    partials = torch.empty((batch, num_blocks, 4), dtype=torch.float32, device=device)
    part_idx = torch.empty((batch, num_blocks), dtype=torch.int32, device=device)
    seen_u8 = seen.view(torch.uint8) if seen.dtype == torch.bool else seen
    blocked_u8 = None if blocked is None else blocked.view(torch.uint8) if blocked.dtype == torch.bool else blocked
    dummy = partials  # any device pointer for the arguments a mode does not read
    _head_partials_kernel[(num_blocks, batch)](
        hidden, hidden.stride(0), table, table.stride(0), seen_u8, seen_u8.stride(0),
        seen_u8 if blocked_u8 is None else blocked_u8, 0 if blocked_u8 is None else blocked_u8.stride(0), extra_ids,
        noise if sample else dummy, noise.stride(0) if sample else 0,
        logits_out if logits_out is not None else dummy, logits_out.stride(0) if logits_out is not None else 0,
        partials, part_idx, start, n_range, n, hidden.shape[1], num_blocks,
        float(penalty), 1.0 / temperature if sample else 1.0,
        SAMPLE=sample, WRITE_LOGITS=logits_out is not None, BLOCKED=blocked is not None, BLOCK_R=BLOCK_R, BLOCK_H=BLOCK_H,
    )
    _head_reduce_kernel[(batch,)](
        partials, part_idx, extra_ids, token_out, prob_out, start, n_range, num_blocks,
        BLOCK_NB=triton.next_power_of_2(num_blocks),
    )
    return token_out, prob_out


# --------------------------------------------------------------------------- torch reference


def sample_index(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor, top_k: int = 0,
                 top_p: float = 1.0) -> torch.Tensor:
    """Row index drawn from softmax(logits / T) after top-k then top-p truncation, per batch row.

    ``logits`` [B, n] (penalized); ``uniforms`` [B, n] in [0, 1). NumpyHead's rules: top-k keeps
    every logit >= the k-th largest; top-p keeps the smallest prefix of the probability-sorted
    rows (stable order) whose mass reaches top_p. The draw is argmax(scaled + Gumbel(u)),
    so it runs on the device without a host round trip."""
    scaled = logits.float() * (1.0 / temperature)
    n = scaled.shape[-1]
    if top_k and top_k < n:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(scaled.double(), dim=-1)
        ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        # mass of the rows ranked ahead of each (shifted cumsum, not cumsum - p: no cancellation)
        before = torch.cat([torch.zeros_like(ordered[:, :1]), torch.cumsum(ordered, dim=-1)[:, :-1]], dim=-1)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    return torch.argmax(scaled - torch.log(-torch.log(uniforms)), dim=-1)


def restricted_head_reference(
    hidden: torch.Tensor,
    table: torch.Tensor,
    seen: torch.Tensor,
    start: int,
    stop: int,
    extra_ids: torch.Tensor | None = None,
    penalty: float = 1.0,
    temperature: float = 0.0,
    noise: torch.Tensor | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    blocked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same choice in plain torch: (token [B] int64, probability [B] float32, penalized logits [B, n])."""
    tokens = torch.arange(start, stop, device=table.device)
    if extra_ids is not None:
        tokens = torch.cat([tokens, extra_ids.to(table.device)])
    logits = hidden.float() @ table[tokens].float().T
    marked = seen[:, tokens].bool()
    logits = torch.where(marked, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if blocked is not None:
        logits = logits.masked_fill(blocked[:, tokens].bool(), float("-inf"))
    if temperature == 0:
        index = torch.argmax(logits, dim=-1)
    else:
        index = sample_index(logits, temperature, noise, top_k, top_p)
    prob = torch.softmax(logits, dim=-1).gather(-1, index[:, None])[:, 0]
    return tokens[index], prob, logits
