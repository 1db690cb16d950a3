"""The ``torch`` backend on CUDA: the compact model with the Triton kernels and one CUDA graph per step kind.

Decode steps (k = 1 for free / coordinate / choice steps, k > 1 for a jump-forward append)
run a graph captured once per k: embedding, per layer q/k/v projections, the
decode-attention kernel (rotary + in-place cache append + split-context GQA), o_proj and
MLP, each residual add fused with the RMSNorm after it (one kernel instead of up to nine), into
one static hidden buffer. The graph reads its token ids, positions
and the cache length from one static device buffer that the host fills by a single
asynchronous copy from pinned memory, so replaying needs no capture per length.

The head (:class:`DeviceHead`) keeps hidden states, logits and the seen-token record on
the device: the restricted-head kernel over the allowed rows of the tied embedding, one
graph per allowed-set shape; sampling noise is drawn on the device. A phrase step's blocked
rows (a host mask the loop keeps per phrase context) go to the device once per mask and
are copied device-to-device into the static mask the graphs read when the mask changes. The only wait per
token is reading the chosen id and its probability (16 bytes) from pinned memory.

``prefill`` runs the model's own (SDPA) forward once per prompt, not captured. Hidden
states returned by ``prefill`` / ``step`` are the static device buffer, for this
backend's head only; the loop never reads them on the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from rexedge.runtime.backends.base import (
    DEFAULT_MAX_CONTEXT,
    BackendError,
    check_capacity,
    check_embeds,
    check_image,
    check_positions,
    check_token_ids,
)
from rexedge.runtime.backends.torch_cpu import TORCH_DTYPES
from rexedge.runtime.head import Sampling

try:
    import torch
except ImportError:  # the runtime core installs without torch
    torch = None

if TYPE_CHECKING:
    from rexedge.runtime.preprocess import PreprocessedImage

MAX_APPEND = 64   # the most tokens one step appends (the decode loop's jump-forward buffer)


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


def capture(fn: Callable[[], None]) -> "torch.cuda.CUDAGraph":
    """Run ``fn`` once on a side stream (compiles the Triton kernels, creates library handles), then capture it.

    ``fn`` must be idempotent on its static buffers: the warm-up run happens for real."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class DeviceHead:
    """rexedge.runtime.head.Head on the device: restricted-head kernel, seen mask and sampling on the GPU."""

    def __init__(self, table: "torch.Tensor", hidden: "torch.Tensor", sampling: Sampling) -> None:
        self.sampling = sampling
        device = table.device
        vocab = table.shape[0]
        self._table = table
        self._hidden = hidden.view(1, -1)                       # the backend's static hidden buffer
        self._seen = torch.zeros(1, vocab, dtype=torch.uint8, device=device)
        self._blocked = torch.zeros(1, vocab, dtype=torch.uint8, device=device)   # what the graphs read
        self._blocked_masks: dict[int, tuple[np.ndarray, torch.Tensor]] = {}    # id -> (host mask, device copy)
        self._blocked_now: np.ndarray | None = None
        # any set of distinct ids fits (a constrained phrase's branch point lists one per category)
        self._ids = torch.zeros(vocab, dtype=torch.int64, device=device)
        self._ids_host = torch.zeros(vocab, dtype=torch.int64).pin_memory()
        self._ids_staged = self._ids_host.numpy()               # the same pinned memory, written per step
        self._noise = torch.empty(1, vocab, dtype=torch.float32, device=device)
        self._logits = torch.empty(1, vocab, dtype=torch.float32, device=device)
        self._token = torch.empty(1, dtype=torch.int64, device=device)
        self._prob = torch.empty(1, dtype=torch.float32, device=device)
        self._result = torch.empty(2, dtype=torch.float64, device=device)   # (token, probability)
        self._result_host = torch.empty(2, dtype=torch.float64).pin_memory()
        self._copied = torch.cuda.Event()
        self._generator = torch.Generator(device=device)
        if sampling.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(sampling.seed)
        self._graphs: dict[tuple[int, int, int, bool], torch.cuda.CUDAGraph] = {}

    def reset(self, prompt_ids: np.ndarray) -> None:
        self._seen.zero_()
        self._seen[0, torch.as_tensor(np.asarray(prompt_ids, np.int64)).to(self._seen.device)] = 1

    def observe(self, token_id: int) -> None:
        self._seen[0, token_id] = 1

    def choose_full(self, hidden, blocked: np.ndarray | None = None) -> tuple[int, float]:
        if blocked is not None:
            self._use_blocked(blocked)
        return self._choose(hidden, 0, self._table.shape[0], (), blocked is not None)

    def choose_range(self, hidden, start: int, stop: int, extra: tuple[int, ...] = ()) -> tuple[int, float]:
        return self._choose(hidden, start, stop, extra)

    def choose_ids(self, hidden, ids: tuple[int, ...]) -> tuple[int, float]:
        return self._choose(hidden, 0, 0, ids)

    def _use_blocked(self, blocked: np.ndarray) -> None:
        """Make ``blocked`` [V] bool the mask the graphs read; the loop passes the same array for a phrase
        context every time, so each is uploaded once (entries keep their array: an id is never reused)."""
        if blocked is self._blocked_now:
            return
        entry = self._blocked_masks.get(id(blocked))
        if entry is None:
            if blocked.shape != (self._table.shape[0],) or blocked.dtype != np.bool_:
                raise BackendError(f"torch backend: blocked must be a bool mask of shape ({self._table.shape[0]},), "
                                   f"got {blocked.dtype} {blocked.shape}")
            entry = self._blocked_masks[id(blocked)] = (blocked, torch.from_numpy(blocked.view(np.uint8)).to(
                self._blocked.device)[None])
        self._blocked.copy_(entry[1])
        self._blocked_now = blocked

    def _step(self, start: int, stop: int, n_extra: int, use_blocked: bool) -> None:
        """The captured head step: kernel (+ truncated sampling), result packed for one 16-byte copy."""
        n = stop - start + n_extra
        with torch.inference_mode():
            choose_on_device(self._table, self._hidden, self._seen, start, stop, self._ids[:n_extra] if n_extra else None,
                             self.sampling, self._noise[:, :n], self._logits[:, :n], self._token, self._prob,
                             self._blocked if use_blocked else None)
            self._result[0:1].copy_(self._token)
            self._result[1:2].copy_(self._prob)

    def _choose(self, hidden, start: int, stop: int, extra: tuple[int, ...], use_blocked: bool = False
                ) -> tuple[int, float]:
        if stop - start + len(extra) > self._noise.shape[1]:
            raise BackendError(f"torch backend: {stop - start + len(extra)} allowed rows in one step; the vocabulary "
                               f"has {self._noise.shape[1]}")
        if not (isinstance(hidden, torch.Tensor) and hidden.data_ptr() == self._hidden.data_ptr()):
            # a hidden state from elsewhere (host array): the graphs read the static buffer
            self._hidden.copy_(torch.as_tensor(np.asarray(hidden)).view(1, -1))
        if extra:
            # the previous step's read of _ids_host has completed: every choose ends in a synchronize
            self._ids_staged[: len(extra)] = extra
            self._ids[: len(extra)].copy_(self._ids_host[: len(extra)], non_blocking=True)
        if self.sampling.temperature > 0:
            n = stop - start + len(extra)
            self._noise[:, :n].uniform_(generator=self._generator)
        key = (start, stop, len(extra), use_blocked)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = capture(lambda: self._step(*key))
        graph.replay()
        self._result_host.copy_(self._result, non_blocking=True)
        self._copied.record()
        self._copied.synchronize()   # the one wait per token
        token, prob = self._result_host.tolist()
        return int(token), prob


class TorchCudaBackend:
    """Runs a checkpoint directory with the compact torch model on one CUDA device."""

    name = "torch"

    def __init__(self, model_path: str | Path, device: str = "cuda", max_context: int = DEFAULT_MAX_CONTEXT,
                 dtype: str = "bfloat16") -> None:
        require_cuda(device)
        if dtype not in TORCH_DTYPES:
            raise BackendError(f"torch backend: dtype {dtype!r}, expected one of {sorted(TORCH_DTYPES)}")
        from rexedge.export.checkpoint import load_model
        from rexedge.runtime.tokenizer import Tokenizer

        model = load_model(model_path, dtype=getattr(torch, TORCH_DTYPES[dtype]), device=torch.device(device))
        self._setup(model, Tokenizer.from_dir(model_path), max_context)

    @classmethod
    def from_model(cls, model, tokenizer=None, max_context: int = DEFAULT_MAX_CONTEXT) -> "TorchCudaBackend":
        """A backend over a compact model already on a CUDA device (benchmarks: random 3B weights made on the GPU)."""
        require_cuda(str(model.head_weight.device))
        backend = cls.__new__(cls)
        backend._setup(model, tokenizer, max_context)
        return backend

    def _setup(self, model, tokenizer, max_context: int) -> None:
        from rexedge.export.model import KVCache

        self._model = model.eval()
        self.device = model.head_weight.device
        self._dtype = model.head_weight.dtype
        self.config = cfg = model.config
        if not 1 <= max_context <= cfg.max_position_embeddings:
            raise BackendError(f"torch backend: max_context must be in 1..{cfg.max_position_embeddings}, got {max_context}")
        self.tokenizer = tokenizer
        # host copy for the loop's prompt embedding lookup (vocab x hidden x 4 bytes: 1.2 GB for the 3B model)
        self.embed_table = model.head_weight.detach().cpu().float().numpy()   # cast on the host: no fp32 copy on the GPU
        self.max_context = max_context
        self._cache = KVCache.allocate(cfg, 1, max_context, dtype=self._dtype, device=self.device)
        self._length = 0
        self._hidden = torch.empty(cfg.hidden_size, dtype=self._dtype, device=self.device)
        # [cache length, token ids (MAX_APPEND), positions (3 x MAX_APPEND)]: one copy per step
        self._inputs_host = torch.zeros(1 + 4 * MAX_APPEND, dtype=torch.int64).pin_memory()
        self._inputs_staged = self._inputs_host.numpy()         # the same pinned memory, written per step
        self._inputs = torch.zeros(1 + 4 * MAX_APPEND, dtype=torch.int64, device=self.device)
        self._inputs_sent = torch.cuda.Event()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @property
    def cache_length(self) -> int:
        return self._length

    def make_head(self, sampling: Sampling) -> DeviceHead:
        return DeviceHead(self._model.head_weight.detach(), self._hidden, sampling)

    def encode_image(self, image: PreprocessedImage) -> np.ndarray:
        check_image(self.name, image, self.config)
        with torch.inference_mode():
            patches = torch.from_numpy(np.array(image.pixel_patches, np.float32)).to(self.device)
            return self._model.encode_image(patches, image.layout).float().cpu().numpy()

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> "torch.Tensor":
        embeds = check_embeds(self.name, inputs_embeds, self.config.hidden_size)
        tokens = embeds.shape[0]
        positions = check_positions(self.name, position_ids, tokens)
        check_capacity(self.name, 0, tokens, self.max_context)
        with torch.inference_mode():
            x = torch.from_numpy(np.array(embeds, np.float32)).to(self.device, self._dtype)[None]
            pos = torch.from_numpy(np.array(positions, np.int64)).to(self.device)[:, None]
            hidden = self._model.decode(x, pos, self._cache, torch.arange(tokens, device=self.device), kv_length=tokens)
            self._hidden.copy_(hidden[0, -1])
        self._length = tokens
        return self._hidden

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> "torch.Tensor":
        token_ids = check_token_ids(self.name, token_ids, self.config.vocab_size)
        k = token_ids.size
        positions = check_positions(self.name, position_ids, k)
        if k > MAX_APPEND:
            raise BackendError(f"torch backend: {k} tokens in one step; at most {MAX_APPEND}")
        check_capacity(self.name, self._length, k, self.max_context)
        self._inputs_sent.synchronize()   # normally long done: the head waited on a later event
        staged = self._inputs_staged
        staged[0] = self._length
        staged[1:1 + k] = token_ids
        staged[1 + MAX_APPEND:].reshape(3, MAX_APPEND)[:, :k] = positions
        self._inputs.copy_(self._inputs_host, non_blocking=True)
        self._inputs_sent.record()
        graph = self._graphs.get(k)
        if graph is None:
            graph = self._graphs[k] = capture(lambda: self._forward(k))
        graph.replay()
        self._length += k
        return self._hidden

    def _forward(self, k: int) -> None:
        """One decode step of k tokens on the static buffers (the body of a captured graph)."""
        with torch.inference_mode():
            self._layers(k)

    def _layers(self, k: int) -> None:
        self._hidden.copy_(decode_step(self._model, self._cache, self._inputs, k, self.max_context))


def choose_on_device(table: "torch.Tensor", hidden: "torch.Tensor", seen: "torch.Tensor", start: int, stop: int,
                     ids: "torch.Tensor | None", sampling: Sampling, noise: "torch.Tensor", logits: "torch.Tensor",
                     token: "torch.Tensor", prob: "torch.Tensor", blocked: "torch.Tensor | None" = None) -> None:
    """One head step into ``token`` [1] / ``prob`` [1] without leaving the device (plain torch + the kernel).

    ``noise`` [1, n] holds fresh uniforms when sampling; ``logits`` [1, n] is scratch for top-k / top-p;
    ``blocked`` [1, V] uint8 marks rows never chosen (phrase steps)."""
    from rexedge.kernels.restricted_head import restricted_head, sample_index

    s = sampling
    sample = s.temperature > 0
    truncate = sample and (s.top_k > 0 or s.top_p < 1.0)
    restricted_head(hidden, table, seen, start, stop, ids, s.repetition_penalty, s.temperature,
                    noise if sample else None, blocked, token_out=token, prob_out=prob, logits_out=logits if truncate else None)
    if truncate:
        # the kernel drew from all allowed rows; top-k / top-p need the sorted row, done here on the device
        index = sample_index(logits, s.temperature, noise, s.top_k, s.top_p)
        prob.copy_(torch.softmax(logits, dim=-1).gather(-1, index[:, None])[:, 0])
        n_range = stop - start
        if ids is None:
            token.copy_(index + start)
        else:
            extra = ids[(index - n_range).clamp(0, ids.shape[0] - 1)]
            token.copy_(torch.where(index < n_range, index + start, extra))


def decode_step(model, cache, inputs: "torch.Tensor", k: int, context_bound: int) -> "torch.Tensor":
    """Hidden state [H] of the last of k new tokens: the compact model's decoder with the decode-attention and
    add + RMSNorm kernels (each residual add fused with the norm after it).

    ``inputs`` int64 [1 + 4 * MAX_APPEND] = [cache length, token ids, positions (3 x MAX_APPEND)], on the
    model's device, so a captured graph replays with new values; ``cache`` a KVCache written in place."""
    from rexedge.export.model import mrope_cos_sin
    from rexedge.kernels.decode_attention import decode_attention
    from rexedge.kernels.rmsnorm import add_rms_norm

    cfg = model.config
    layers = model.model.layers
    tokens = inputs[1:1 + k]
    positions = inputs[1 + MAX_APPEND:].view(3, MAX_APPEND)[:, None, :k]
    cache_len = inputs[0:1].to(torch.int32)
    x = model.embed(tokens)                                   # [k, H] residual stream, updated in place
    cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, torch.float32)
    first = layers[0].input_layernorm
    h = add_rms_norm(x, None, first.weight, first.eps)
    for i, (layer, k_cache, v_cache) in enumerate(zip(layers, cache.keys, cache.values)):
        attn = layer.self_attn
        q = attn.q_proj(h).view(1, k, cfg.num_attention_heads, cfg.head_dim)
        key = attn.k_proj(h).view(1, k, cfg.num_key_value_heads, cfg.head_dim)
        value = attn.v_proj(h).view(1, k, cfg.num_key_value_heads, cfg.head_dim)
        out = decode_attention(q, key, value, cos, sin, k_cache, v_cache, cache_len, context_bound=context_bound)
        post = layer.post_attention_layernorm
        add_rms_norm(x, attn.o_proj(out.view(k, -1)), post.weight, post.eps, out=h)
        next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else model.model.norm
        add_rms_norm(x, layer.mlp(h), next_norm.weight, next_norm.eps, out=h)
    return h[-1]
