"""The head on a CUDA device: the restricted-head kernel, the seen-token record and sampling on the GPU.

Shared by the torch CUDA backend and the trt backend (with torch + triton installed). It keeps
hidden states, logits and the seen-token record on the device: the restricted-head kernel over
the allowed rows of the tied embedding, one CUDA graph per allowed-set shape; sampling noise
is drawn on the device. A phrase step's blocked rows (a host mask the loop keeps per phrase
context) go to the device once per mask and are copied device-to-device into the static mask
the graphs read when the mask changes. The only wait per token is reading the chosen id and
its probability (16 bytes) from pinned memory.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from rexedge.runtime.backends.base import BackendError
from rexedge.runtime.decode.head import Sampling

try:
    import torch
except ImportError:  # the runtime core installs without torch
    torch = None

# The most head graphs one DeviceHead captures. Structured boxes restrict x1 and y1 to the rows above x0
# and y0 (the grammar's coord_range), so the allowed range, part of a graph's key, takes up to 999 starts:
# past this many shapes a step runs uncaptured (its few kernels launched one by one) instead of holding a
# graph per start. The shapes that recur every answer (x0/y0, phrases, choices) come first and keep theirs.
MAX_HEAD_GRAPHS = 64


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
    """rexedge.runtime.decode.head.Head on the device: restricted-head kernel, seen mask and sampling on the GPU."""

    def __init__(self, table: "torch.Tensor", hidden: "torch.Tensor", sampling: Sampling,
                 capture: Callable[[Callable[[], None]], "torch.cuda.CUDAGraph"] = capture) -> None:
        self.sampling = sampling
        self._capture = capture
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
        if isinstance(hidden, torch.Tensor):
            if hidden.data_ptr() != self._hidden.data_ptr():
                # a row of a batched step, or a slot's prefill: the graphs read the static buffer (H values,
                # device to device, in stream order)
                self._hidden.copy_(hidden.view(1, -1))
        else:   # a host array
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
        if graph is None and len(self._graphs) < MAX_HEAD_GRAPHS:
            graph = self._graphs[key] = self._capture(lambda: self._step(*key))
        if graph is None:
            self._step(*key)
        else:
            graph.replay()
        self._result_host.copy_(self._result, non_blocking=True)
        self._copied.record()
        self._copied.synchronize()   # the one wait per token
        token, prob = self._result_host.tolist()
        return int(token), prob


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
