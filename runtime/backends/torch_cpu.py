"""The ``torch`` backend: the compact model (:mod:`rexedge.runtime.model.compact`) on the CPU, from a checkpoint.

It is the reference the exported graphs are checked against, and needs no export step.
Its KV cache is the model's own per-layer ``[1, kv_heads, max_context, head_dim]``
buffers, written in place; with ``max_batch`` > 1 the buffers hold ``max_batch`` slots of
``max_context + MAX_STEP_TOKENS`` (the batched step's padding room) and ``step_batch`` runs the model's
own layers with ``RowOps`` (made by ``_row_ops``), which give every row its own cache positions. On
CUDA, ``load_backend("torch", ..., device="cuda")`` gives the Triton / CUDA-graph backend instead
(``torch_cuda``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rexedge.runtime.backends.base import (
    DEFAULT_MAX_CONTEXT,
    MAX_STEP_TOKENS,
    TORCH_DTYPES,
    BackendError,
    HostHeadBackend,
    allocate_slots,
    check_batch_step,
    check_capacity,
    check_embeds,
    check_image,
    check_max_batch,
    check_positions,
    check_slot,
    check_token_ids,
)

try:
    import torch
except ImportError:  # the runtime core installs without torch
    torch = None

if TYPE_CHECKING:
    from rexedge.runtime.request.preprocess import PreprocessedImage


def _row_ops():
    """The plain-torch decoder ops with a cache position per row ([B, T]) instead of one for all rows
    (made on first use: the module imports without torch)."""
    from rexedge.runtime.model.compact import DecoderOps, apply_rotary

    class RowOps(DecoderOps):
        def attention_context(self, cache_position: torch.Tensor, kv_length: int) -> torch.Tensor:
            # [B, 1, T, kv_length]: row b's token at slot p sees that row's slots 0..p
            slots = torch.arange(kv_length, device=cache_position.device)
            return (slots[None, None, :] <= cache_position[:, :, None])[:, None]

        def attention(self, q, k, v, cos, sin, key_cache, value_cache, cache_position, context):
            rows = torch.arange(q.shape[0])[:, None]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            cos, sin = cos[:, None], sin[:, None]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            # cache[b, :, cache_position[b, t]] = k[b, :, t]
            key_cache[rows, :, cache_position] = k.transpose(1, 2).to(key_cache.dtype)
            value_cache[rows, :, cache_position] = v.transpose(1, 2).to(value_cache.dtype)
            kv_length = context.shape[-1]
            keys, values = key_cache[:, :, :kv_length].to(q.dtype), value_cache[:, :, :kv_length].to(q.dtype)
            out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=context, enable_gqa=True)
            return out.transpose(1, 2)

    return RowOps()


class TorchBackend(HostHeadBackend):
    """Runs a checkpoint directory with the compact torch model."""

    name = "torch"

    def __init__(self, model_path: str | Path, device: str = "cpu", max_context: int = DEFAULT_MAX_CONTEXT,
                 dtype: str = "float32", max_batch: int = 1) -> None:
        check_max_batch(self.name, max_batch)
        if torch is None:
            raise BackendError("the torch backend needs torch: pip install rexedge[export]")
        if device != "cpu":
            raise BackendError(f"torch CPU backend: device {device!r}; use device='cpu' (or 'cuda' through load_backend)")
        if dtype not in TORCH_DTYPES:
            raise BackendError(f"torch backend: dtype {dtype!r}, expected one of {sorted(TORCH_DTYPES)}")
        from rexedge.runtime.model.checkpoint import load_model
        from rexedge.runtime.model.compact import KVCache
        from rexedge.runtime.request.tokenizer import Tokenizer

        torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        self._model = load_model(model_path, dtype=torch_dtype)
        self.config = self._model.config
        self.pixels = None   # a checkpoint: the official defaults (its processor config is Qwen's, not Rex-Omni's)
        if not 1 <= max_context <= self.config.max_position_embeddings:
            raise BackendError(f"torch backend: max_context must be in 1..{self.config.max_position_embeddings}, "
                               f"got {max_context}")
        self.tokenizer = Tokenizer.from_dir(model_path)
        # shares memory with the parameter when it is float32
        self.embed_table = self._model.head_weight.detach().float().numpy()
        self.max_context = max_context
        self.max_batch = max_batch
        capacity = max_context if max_batch == 1 else max_context + MAX_STEP_TOKENS
        cfg = self.config
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * torch_dtype.itemsize
        self._cache = allocate_slots(self.name, lambda: KVCache.allocate(cfg, max_batch, capacity, dtype=torch_dtype),
                                     max_batch, capacity, per_token)
        # slot s's cache: views of row s of every buffer (written in place by the batch-1 calls)
        self._slot_caches = [self._cache.slots(s, 1) for s in range(max_batch)]
        # slots 0..n-1 (a batched step of n rows)
        self._first_slots = [self._cache.slots(0, n) for n in range(1, max_batch + 1)]
        self._row_ops = _row_ops() if max_batch > 1 else None
        self._dtype = torch_dtype
        self._lengths = [0] * max_batch

    @property
    def _length(self) -> int:
        return self._lengths[0]

    def slot_length(self, slot: int) -> int:
        check_slot(self.name, slot, self.max_batch)
        return self._lengths[slot]

    def encode_image(self, image: PreprocessedImage) -> np.ndarray:
        check_image(self.name, image, self.config)
        with torch.inference_mode():
            embeds = self._model.encode_image(torch.from_numpy(np.array(image.pixel_patches, np.float32)), image.layout)
        return embeds.float().numpy()

    def _run(self, embeds: torch.Tensor, positions: np.ndarray, slot: int = 0) -> np.ndarray:
        tokens = embeds.shape[1]
        start = self._lengths[slot]
        check_capacity(self.name, start, tokens, self.max_context)
        hidden = self._model.decode(embeds.to(self._dtype), torch.from_numpy(np.array(positions, np.int64))[:, None],
                                    self._slot_caches[slot], torch.arange(start, start + tokens),
                                    kv_length=start + tokens)
        self._lengths[slot] += tokens
        return hidden[0, -1].float().numpy()

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, slot: int = 0) -> np.ndarray:
        embeds = check_embeds(self.name, inputs_embeds, self.config.hidden_size)
        positions = check_positions(self.name, position_ids, embeds.shape[0])
        check_slot(self.name, slot, self.max_batch)
        self._lengths[slot] = 0
        with torch.inference_mode():
            return self._run(torch.from_numpy(np.array(embeds, np.float32))[None], positions, slot)

    def step_batch(self, token_ids: np.ndarray, position_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """One step of slots 0..B-1 (see ``BatchBackend.step_batch``); [B, H]."""
        token_ids, positions, counts = check_batch_step(self.name, token_ids, position_ids, counts, self.max_batch,
                                                        self.config.vocab_size)
        rows, tokens = token_ids.shape
        lengths = np.array(self._lengths[:rows])
        for slot in np.flatnonzero(counts):
            check_capacity(self.name, int(lengths[slot]), int(counts[slot]), self.max_context)
        # padding (and a row not stepping) is written after the row's cache: the room max_context leaves
        cache_position = torch.from_numpy(lengths[:, None] + np.arange(tokens))
        cache = self._first_slots[rows - 1]
        with torch.inference_mode():
            hidden = self._model.decode(self._model.embed(torch.from_numpy(token_ids.astype(np.int64))).to(self._dtype),
                                        torch.from_numpy(positions.astype(np.int64)), cache, cache_position,
                                        kv_length=int(lengths.max()) + tokens, ops=self._row_ops)
        for slot in range(rows):
            self._lengths[slot] += int(counts[slot])
        return hidden[torch.arange(rows), torch.from_numpy(np.maximum(counts, 1) - 1)].float().numpy()

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray, slot: int = 0) -> np.ndarray:
        token_ids = check_token_ids(self.name, token_ids, self.config.vocab_size)
        positions = check_positions(self.name, position_ids, token_ids.size)
        check_slot(self.name, slot, self.max_batch)
        with torch.inference_mode():
            return self._run(self._model.embed(torch.from_numpy(np.array(token_ids, np.int64))[None]), positions, slot)

    def copy_slot(self, source: int, target: int) -> None:
        """Slot ``target`` gets a copy of ``source``'s cache (branches that share a prefill)."""
        check_slot(self.name, source, self.max_batch)
        check_slot(self.name, target, self.max_batch)
        self._cache.copy_slot(source, target, self._lengths[source])
        self._lengths[target] = self._lengths[source]

