"""The ``torch`` backend on CUDA: the compact model with the Triton kernels and one CUDA graph per step kind.

Decode steps (k = 1 for free / coordinate / choice steps, k > 1 for a jump-forward append)
run a graph captured once per k: embedding, per layer q/k/v projections, the
decode-attention kernel (rotary + in-place cache append + split-context GQA), o_proj and
MLP, each residual add fused with the RMSNorm after it (one kernel instead of up to nine), into
one static hidden buffer. The graph reads its token ids, positions
and the cache length from one static device buffer that the host fills by a single
asynchronous copy from pinned memory, so replaying needs no capture per length.

The layers are the compact model's own, run with :class:`KernelOps`. The head is :class:`rexedge.runtime.backends.device_head.DeviceHead` (on the device, one graph per
allowed-set shape, captured with this module's ``capture``). The only wait per token is reading
the chosen id and its probability (16 bytes) from pinned memory.

``prefill`` runs the model's own (SDPA) forward once per prompt, not captured. Hidden
states returned by ``prefill`` / ``step`` are the static device buffer, for this
backend's head only; the loop never reads them on the host.

With ``max_batch`` > 1 the cache holds ``max_batch`` slots of ``max_context + MAX_STEP_TOKENS`` (the
batched step's padding room) and ``step_batch`` replays a graph captured per (batch bucket, width):
the buckets are the powers of two below ``max_batch`` and ``max_batch`` itself (1, 2, 4, 8, 16 for 16),
a step of B rows runs the smallest bucket >= B, and its width is the longest run of the step rounded up to
a power of two (so jump-forward runs of different lengths are padded, as on the CPU, in at most
7 widths). The decode-attention kernel takes a cache length per row, so every row appends at its own
slot; the rows past B and the padding write after their slot's cached tokens, never attended to (the
same room as a row not stepping). Prefill and ``step(..., slot=s)`` of one slot run uncaptured into a
hidden buffer per slot; each head copies the row it chooses from into its static buffer (H values on
the device). The full-vocabulary rows of a step are each the head's own product (not shared).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rexedge.runtime.backends.base import (
    DEFAULT_MAX_CONTEXT,
    TORCH_DTYPES,
    BackendError,
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
from rexedge.runtime.backends.device_head import DeviceHead, capture
from rexedge.runtime.decode.head import Sampling
from rexedge.runtime.decode.loop import MAX_STEP_TOKENS

try:
    import torch
except ImportError:  # the runtime core installs without torch
    torch = None

if TYPE_CHECKING:
    from rexedge.runtime.request.preprocess import PreprocessedImage

MAX_APPEND = MAX_STEP_TOKENS   # the most tokens one step appends: the decode loop's jump-forward buffer


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a graph is captured for: the powers of two below ``max_batch``, and ``max_batch``."""
    return sorted({1 << i for i in range(max_batch.bit_length())} | {max_batch})


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The smallest bucket holding ``rows`` rows."""
    return next(b for b in buckets if b >= rows)


def step_width(tokens: int) -> int:
    """The captured width of a batched step whose longest run is ``tokens``: the power of two >= it."""
    return min(1 << (tokens - 1).bit_length(), MAX_APPEND)


def step_inputs_size(slots: int) -> int:
    """int64 values of the packed step inputs of ``slots`` rows (see :func:`decode_step`)."""
    return slots * (2 + 4 * MAX_APPEND)


def require_cuda(device: str) -> None:
    """Raise BackendError unless torch with CUDA and triton are importable and ``device`` exists."""
    if torch is None:
        raise BackendError("the torch backend needs torch: pip install rexedge[kernels]")
    if not torch.cuda.is_available():
        raise BackendError(f"torch backend: device {device!r} asked for, but torch sees no CUDA device "
                           f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use device='cpu'")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise BackendError("the torch backend on CUDA needs triton: pip install rexedge[kernels]") from None
    try:
        index = torch.device(device).index or 0
    except RuntimeError as e:
        raise BackendError(f"torch backend: device {device!r} is not a device name ({e})") from None
    if index >= torch.cuda.device_count():
        raise BackendError(f"torch backend: device {device!r} does not exist; {torch.cuda.device_count()} CUDA device(s)")


class TorchCudaBackend:
    """Runs a checkpoint directory with the compact torch model on one CUDA device."""

    name = "torch"

    def __init__(self, model_path: str | Path, device: str = "cuda", max_context: int = DEFAULT_MAX_CONTEXT,
                 dtype: str = "bfloat16", max_batch: int = 1) -> None:
        check_max_batch(self.name, max_batch)
        require_cuda(device)
        if dtype not in TORCH_DTYPES:
            raise BackendError(f"torch backend: dtype {dtype!r}, expected one of {sorted(TORCH_DTYPES)}")
        from rexedge.runtime.model.checkpoint import load_model
        from rexedge.runtime.request.tokenizer import Tokenizer

        model = load_model(model_path, dtype=getattr(torch, TORCH_DTYPES[dtype]), device=torch.device(device))
        self._setup(model, Tokenizer.from_dir(model_path), max_context, max_batch)

    @classmethod
    def from_model(cls, model, tokenizer=None, max_context: int = DEFAULT_MAX_CONTEXT,
                   max_batch: int = 1) -> "TorchCudaBackend":
        """A backend over a compact model already on a CUDA device (benchmarks: random 3B weights made on the GPU)."""
        check_max_batch(cls.name, max_batch)
        require_cuda(str(model.head_weight.device))
        backend = cls.__new__(cls)
        backend._setup(model, tokenizer, max_context, max_batch)
        return backend

    def _setup(self, model, tokenizer, max_context: int, max_batch: int) -> None:
        from rexedge.runtime.model.compact import KVCache

        self._model = model.eval()
        self.device = model.head_weight.device
        self._dtype = model.head_weight.dtype
        self.config = cfg = model.config
        self.pixels = None   # a checkpoint: the official defaults (its processor config is Qwen's, not Rex-Omni's)
        if not 1 <= max_context <= cfg.max_position_embeddings:
            raise BackendError(f"torch backend: max_context must be in 1..{cfg.max_position_embeddings}, got {max_context}")
        self.tokenizer = tokenizer
        # host copy for the loop's prompt embedding lookup (vocab x hidden x 4 bytes: 1.2 GB for the 3B model)
        self.embed_table = model.head_weight.detach().cpu().float().numpy()   # cast on the host: no fp32 copy on the GPU
        self.max_context = max_context
        self.max_batch = max_batch
        # the KV capacity per slot, which is also every captured step's context bound
        self._capacity = max_context if max_batch == 1 else max_context + MAX_STEP_TOKENS
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * self._dtype.itemsize
        self._cache = allocate_slots(self.name, lambda: KVCache.allocate(cfg, max_batch, self._capacity,
                                                                         dtype=self._dtype, device=self.device),
                                     max_batch, self._capacity, per_token)
        self._first_slots = [self._cache.slots(0, n) for n in range(1, max_batch + 1)]   # a step of n rows
        self._lengths = [0] * max_batch
        self._buckets = batch_buckets(max_batch)
        # the heads' static hidden buffer; with one slot also where a step writes its result
        self._hidden = torch.empty(cfg.hidden_size, dtype=self._dtype, device=self.device)
        # batched: a step's rows (the loop reads row b until the next step) and each slot's prefill / step result
        self._rows_hidden = torch.empty(max_batch, cfg.hidden_size, dtype=self._dtype, device=self.device)
        self._slot_hidden = torch.empty(max_batch, cfg.hidden_size, dtype=self._dtype, device=self.device)
        # the packed step inputs (see decode_step): one copy per step
        self._inputs_host = torch.zeros(step_inputs_size(max_batch), dtype=torch.int64).pin_memory()
        self._inputs_staged = self._inputs_host.numpy()         # the same pinned memory, written per step
        self._inputs = torch.zeros(step_inputs_size(max_batch), dtype=torch.int64, device=self.device)
        self._inputs_sent = torch.cuda.Event()
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}   # (rows, width)

    @property
    def cache_length(self) -> int:
        return self._lengths[0]

    def slot_length(self, slot: int) -> int:
        check_slot(self.name, slot, self.max_batch)
        return self._lengths[slot]

    def make_head(self, sampling: Sampling) -> DeviceHead:
        return DeviceHead(self._model.head_weight.detach(), self._hidden, sampling, capture)

    def encode_image(self, image: PreprocessedImage) -> np.ndarray:
        check_image(self.name, image, self.config)
        with torch.inference_mode():
            patches = torch.from_numpy(np.array(image.pixel_patches, np.float32)).to(self.device)
            return self._model.encode_image(patches, image.layout).float().cpu().numpy()

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, slot: int = 0) -> "torch.Tensor":
        embeds = check_embeds(self.name, inputs_embeds, self.config.hidden_size)
        positions = check_positions(self.name, position_ids, embeds.shape[0])
        check_slot(self.name, slot, self.max_batch)
        self._lengths[slot] = 0
        with torch.inference_mode():
            x = torch.from_numpy(np.array(embeds, np.float32)).to(self.device, self._dtype)[None]
            return self._append_slot(slot, x, positions)

    def _append_slot(self, slot: int, x: "torch.Tensor", positions: np.ndarray) -> "torch.Tensor":
        """Embeddings [1, T, H] into ``slot`` after its cached tokens, uncaptured (the model's SDPA forward);
        the last hidden state, in the heads' buffer (one slot) or the slot's own (batched)."""
        tokens, start = x.shape[1], self._lengths[slot]
        check_capacity(self.name, start, tokens, self.max_context)
        pos = torch.from_numpy(np.array(positions, np.int64)).to(self.device)[:, None]
        hidden = self._model.decode(x, pos, self._cache.slots(slot, 1),
                                    torch.arange(start, start + tokens, device=self.device), kv_length=start + tokens)
        out = self._hidden if self.max_batch == 1 else self._slot_hidden[slot]
        out.copy_(hidden[0, -1])
        self._lengths[slot] += tokens
        return out

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray, slot: int = 0) -> "torch.Tensor":
        token_ids = check_token_ids(self.name, token_ids, self.config.vocab_size)
        k = token_ids.size
        positions = check_positions(self.name, position_ids, k)
        check_slot(self.name, slot, self.max_batch)
        if self.max_batch > 1:   # one slot of several (a branch's own prompt): uncaptured, any length
            with torch.inference_mode():
                x = self._model.embed(torch.from_numpy(np.array(token_ids, np.int64)).to(self.device))[None]
                return self._append_slot(slot, x, positions)
        if k > MAX_APPEND:
            raise BackendError(f"torch backend: {k} tokens in one step; at most {MAX_APPEND}")
        check_capacity(self.name, self._lengths[0], k, self.max_context)
        lengths, last, tokens, pos = self._stage()
        lengths[0], last[0] = self._lengths[0], k - 1
        tokens[0, :k] = token_ids
        pos[:, 0, :k] = positions
        self._replay(1, k)
        self._lengths[0] += k
        return self._hidden

    def step_batch(self, token_ids: np.ndarray, position_ids: np.ndarray, counts: np.ndarray) -> "torch.Tensor":
        """One step of slots 0..B-1 (see ``BatchBackend.step_batch``): [B, H] on the device, valid until the next
        step."""
        token_ids, positions, counts = check_batch_step(self.name, token_ids, position_ids, counts, self.max_batch,
                                                        self.config.vocab_size)
        rows, k = token_ids.shape
        for slot in np.flatnonzero(counts):
            check_capacity(self.name, self._lengths[slot], int(counts[slot]), self.max_context)
        bucket, width = bucket_for(rows, self._buckets), step_width(k)
        lengths, last, tokens, pos = self._stage()
        lengths[:] = self._lengths
        last[:rows] = np.maximum(counts, 1) - 1
        last[rows:] = 0
        tokens[:rows, :k] = token_ids
        pos[:, :rows, :k] = positions
        # padding to the width and the bucket's idle rows: any valid id at any position (written past each slot's
        # cached tokens, never attended to)
        tokens[:rows, k:width] = 0
        tokens[rows:bucket, :width] = 0
        pos[:, :rows, k:width] = 0
        pos[:, rows:bucket, :width] = 0
        self._replay(bucket, width)
        for slot in range(rows):
            self._lengths[slot] += int(counts[slot])
        return self._rows_hidden[:rows]

    def _stage(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Views of the pinned input buffer (lengths, last index, tokens, positions; see decode_step), free to
        write: the previous step's copy of it has completed."""
        self._inputs_sent.synchronize()   # normally long done: the head waited on a later event
        return unpack_step_inputs(self._inputs_staged, self.max_batch)

    def _replay(self, rows: int, width: int) -> None:
        """Send the staged inputs and replay the graph of (rows, width), capturing it on first use."""
        self._inputs.copy_(self._inputs_host, non_blocking=True)
        self._inputs_sent.record()
        graph = self._graphs.get((rows, width))
        if graph is None:
            graph = self._graphs[(rows, width)] = capture(lambda: self._forward(rows, width))
        graph.replay()

    def _forward(self, rows: int, width: int) -> None:
        """One decode step of ``rows`` slots, ``width`` tokens each, on the static buffers (a captured graph's body)."""
        with torch.inference_mode():
            hidden = decode_step(self._model, self._first_slots[rows - 1], self._inputs, rows, width, self._capacity,
                                 self.max_batch)
            if self.max_batch == 1:
                self._hidden.copy_(hidden[0])
            else:
                self._rows_hidden[:rows].copy_(hidden)

    def copy_slot(self, source: int, target: int) -> None:
        """Slot ``target`` gets a copy of ``source``'s cache (branches that share a prefill), on the device."""
        check_slot(self.name, source, self.max_batch)
        check_slot(self.name, target, self.max_batch)
        if self.max_batch == 1:
            raise BackendError("torch backend: copying a KV slot needs max_batch > 1")
        self._cache.copy_slot(source, target, self._lengths[source])
        self._lengths[target] = self._lengths[source]


class KernelOps:
    """The compact model's decoder ops as the Triton kernels: the decode-attention kernel (rotary + in-place
    cache append + split-context GQA, fp32 rotary tables) and each residual add fused with the RMSNorm after
    it, in place on the residual stream. Built per step (it holds nothing the graph replays with)."""

    def __init__(self, context_bound: int, cache_len: "torch.Tensor") -> None:
        self.context_bound = context_bound
        self.cache_len = cache_len   # int32 [B] on the device: slots already filled, per row

    def attention_context(self, cache_position, kv_length: int) -> "torch.Tensor":
        return self.cache_len

    def rotary(self, position_ids, head_dim, theta, mrope_section, dtype):
        from rexedge.runtime.model.compact import mrope_cos_sin

        return mrope_cos_sin(position_ids, head_dim, theta, mrope_section, torch.float32)

    def attention(self, q, k, v, cos, sin, key_cache, value_cache, cache_position, context):
        from rexedge.kernels.decode_attention import decode_attention

        return decode_attention(q, k, v, cos, sin, key_cache, value_cache, context, context_bound=self.context_bound)

    def residual_norm(self, x, delta, norm, out):
        from rexedge.kernels.rmsnorm import add_rms_norm

        rows = x.view(-1, x.shape[-1])
        normed = add_rms_norm(rows, None if delta is None else delta.view_as(rows), norm.weight, norm.eps,
                              out=None if out is None else out.view_as(rows))
        return x, normed.view_as(x)


def unpack_step_inputs(inputs, slots: int):
    """The packed step inputs of ``slots`` rows (a flat int64 array or tensor of :func:`step_inputs_size`) as
    views: cache lengths [slots], last real token per row [slots], token ids [slots, MAX_APPEND], positions
    [3, slots, MAX_APPEND]."""
    tokens_end = 2 * slots + slots * MAX_APPEND
    return (inputs[:slots], inputs[slots:2 * slots], inputs[2 * slots:tokens_end].reshape(slots, MAX_APPEND),
            inputs[tokens_end:].reshape(3, slots, MAX_APPEND))


def decode_step(model, cache, inputs: "torch.Tensor", rows: int, k: int, context_bound: int,
                slots: int = 1) -> "torch.Tensor":
    """Hidden states [rows, H] of the first ``rows`` slots after appending k tokens to each (row b's state after
    its token ``last[b]``): the compact model's decoder run with :class:`KernelOps`.

    ``inputs``: the packed step inputs of ``slots`` rows (:func:`unpack_step_inputs`), on the model's device, so a
    captured graph replays with new values; ``cache`` a KVCache of ``rows`` rows, written in place at each row's
    cache length (the kernel takes one per row)."""
    lengths, last, tokens, positions = unpack_step_inputs(inputs, slots)
    ops = KernelOps(context_bound, lengths[:rows].to(torch.int32))
    # no cache_position: the kernels place the new tokens from ``ops.cache_len``, a device value a replay reads
    hidden = model.decode(model.embed(tokens[:rows, :k]), positions[:, :rows, :k], cache, None,
                          kv_length=context_bound, ops=ops)
    return hidden[torch.arange(rows, device=hidden.device), last[:rows]]
