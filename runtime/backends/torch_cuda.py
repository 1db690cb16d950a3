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
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rexedge.runtime.backends.base import (
    DEFAULT_MAX_CONTEXT,
    TORCH_DTYPES,
    BackendError,
    check_capacity,
    check_embeds,
    check_image,
    check_max_batch,
    check_positions,
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
        # no batched step yet (it would need a captured graph per batch-size bucket)
        check_max_batch(self.name, max_batch, 1)
        require_cuda(device)
        if dtype not in TORCH_DTYPES:
            raise BackendError(f"torch backend: dtype {dtype!r}, expected one of {sorted(TORCH_DTYPES)}")
        from rexedge.runtime.model.checkpoint import load_model
        from rexedge.runtime.request.tokenizer import Tokenizer

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
        from rexedge.runtime.model.compact import KVCache

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
        return DeviceHead(self._model.head_weight.detach(), self._hidden, sampling, capture)

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


class KernelOps:
    """The compact model's decoder ops as the Triton kernels: the decode-attention kernel (rotary + in-place
    cache append + split-context GQA, fp32 rotary tables) and each residual add fused with the RMSNorm after
    it, in place on the residual stream. Built per step (it holds nothing the graph replays with)."""

    def __init__(self, context_bound: int, cache_len: "torch.Tensor") -> None:
        self.context_bound = context_bound
        self.cache_len = cache_len   # int32 [1] on the device: slots already filled

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


def decode_step(model, cache, inputs: "torch.Tensor", k: int, context_bound: int) -> "torch.Tensor":
    """Hidden state [H] of the last of k new tokens: the compact model's decoder run with :class:`KernelOps`.

    ``inputs`` int64 [1 + 4 * MAX_APPEND] = [cache length, token ids, positions (3 x MAX_APPEND)], on the
    model's device, so a captured graph replays with new values; ``cache`` a KVCache written in place."""
    tokens = inputs[1:1 + k]
    positions = inputs[1 + MAX_APPEND:].view(3, MAX_APPEND)[:, None, :k]
    ops = KernelOps(context_bound, inputs[0:1].to(torch.int32))
    # no cache_position: the kernels place the new tokens from ``ops.cache_len``, a device value a replay reads
    hidden = model.decode(model.embed(tokens)[None], positions, cache, None, kv_length=context_bound, ops=ops)
    return hidden[0, -1]
