"""The output head on the host (numpy), restricted to the rows the grammar allows.

logits = E[rows] @ hidden, with E the tied embedding [vocab, H]. In structured decoding a
coordinate step multiplies 1,000 rows instead of the whole vocabulary (151,936 for the
real model); on a CPU that product is most of a small model's decode step, so the
restriction is the main saving. Everything per token runs in pre-allocated buffers.

The small products (coordinate rows, a few listed ids) run on one BLAS thread: split over
threads they gain nothing, and on a busy CPU (a robot's camera and control loop beside us)
waking the second thread waited for a time slice: 5-24 ms per coordinate step instead of
0.2 ms (bench/RESULTS.md). The full-vocabulary product keeps every thread.

Choosing a token (`choose`) follows transformers' order of logits processors:
repetition penalty (divide positive logits of seen tokens, multiply negative ones),
then, when sampling, temperature, top-k and top-p. The confidence returned with the
token is its probability under the softmax over the allowed rows after the penalty
(temperature 1): with the 1,000 coordinate rows that is the box-coordinate confidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
from threadpoolctl import ThreadpoolController

from rexedge.runtime.errors import RexEdgeError

# CHOICE steps and the extra ids of a COORD step are a handful of ids (the grammar's longest is 2);
# a constrained phrase's branch point can list one id per category: the buffers grow to fit
LISTED_IDS = 64


class SamplingError(RexEdgeError, ValueError):
    """Generation settings out of range (temperature, top_p, top_k, repetition_penalty)."""


@dataclass(frozen=True)
class Sampling:
    """Generation settings of the official wrapper; temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0              # 0: off
    repetition_penalty: float = 1.05
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise SamplingError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Chooser:
    """Penalty + greedy / sampling over a logits vector, in place, without allocating.

    `seen` is a per-sequence record of every token id in the prompt and the output.
    """

    def __init__(self, vocab_size: int, sampling: Sampling) -> None:
        self.sampling = sampling
        self.seen = np.zeros(vocab_size, dtype=bool)
        self._rng = np.random.default_rng(sampling.seed)
        self._mask = np.empty(vocab_size, dtype=bool)
        self._mask2 = np.empty(vocab_size, dtype=bool)
        self._scratch = np.empty(vocab_size, dtype=np.float32)

    def reset(self, prompt_ids: np.ndarray) -> None:
        self.seen[:] = False
        self.seen[prompt_ids] = True

    def observe(self, token_id: int) -> None:
        self.seen[token_id] = True

    def penalize(self, logits: np.ndarray, seen: np.ndarray) -> None:
        """Apply the repetition penalty to `logits` in place (seen: the same rows' record)."""
        p = self.sampling.repetition_penalty
        if p == 1.0:
            return
        n = logits.shape[0]
        positive, negative = self._mask[:n], self._mask2[:n]
        np.greater(logits, 0, out=positive)
        np.logical_not(positive, out=negative)
        np.logical_and(positive, seen, out=positive)
        np.logical_and(negative, seen, out=negative)
        np.divide(logits, p, out=logits, where=positive)
        np.multiply(logits, p, out=logits, where=negative)

    def choose(self, logits: np.ndarray) -> tuple[int, float]:
        """Index into `logits` (already penalized) and its softmax probability."""
        n = logits.shape[0]
        probs = self._scratch[:n]
        top = float(logits.max())
        np.subtract(logits, top, out=probs)
        np.exp(probs, out=probs)
        total = float(probs.sum())
        if self.sampling.temperature == 0.0:
            index = int(logits.argmax())
        else:
            distribution = self.distribution(logits)
            index = int(self._rng.choice(distribution.shape[0], p=distribution))
        return index, float(probs[index]) / total

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The sampling distribution over `logits` (already penalized): temperature, then top-k, then top-p.

        Sampling only (temperature > 0); it allocates (sorting for top-p), greedy decoding does not.
        """
        s = self.sampling
        if s.temperature == 0.0:
            raise SamplingError("distribution() is for sampling; temperature 0 means greedy")
        scaled = logits.astype(np.float64) / s.temperature
        if s.top_k and s.top_k < scaled.shape[0]:
            kth = np.partition(scaled, -s.top_k)[-s.top_k]
            scaled[scaled < kth] = -np.inf
        scaled -= scaled.max()
        probs = np.exp(scaled)
        probs /= probs.sum()
        if s.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            cut = int(np.searchsorted(cumulative, s.top_p)) + 1
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        return probs


class Head(Protocol):
    """What the decode loop asks of a head; each choose_* returns (token id, its probability)."""

    def reset(self, prompt_ids: np.ndarray) -> None: ...
    def observe(self, token_id: int) -> None: ...
    def choose_full(self, hidden: np.ndarray, blocked: np.ndarray | None = None) -> tuple[int, float]: ...
    def choose_range(self, hidden: np.ndarray, start: int, stop: int, extra: tuple[int, ...] = ()) -> tuple[int, float]: ...
    def choose_ids(self, hidden: np.ndarray, ids: tuple[int, ...]) -> tuple[int, float]: ...


class _OneBlasThread:
    """A reusable context: numpy's OpenBLAS on one thread inside, its own count restored after.

    It calls OpenBLAS's thread-count functions, found once through threadpoolctl, directly:
    threadpoolctl's ``limit()`` builds Python objects on every call and its controllers'
    ``set_num_threads`` retained ~250 bytes a call (measured with tracemalloc), too much for
    every decode step. Other BLAS libraries are left alone (numpy's wheels ship OpenBLAS).
    """

    def __init__(self) -> None:
        self._functions = []
        for lib in ThreadpoolController().lib_controllers:
            if lib.internal_api == "openblas":
                setter = lib._get_symbol("openblas_set_num_threads")
                getter = lib._get_symbol("openblas_get_num_threads")
                if setter is not None and getter is not None:
                    self._functions.append((setter, getter))
        self._saved = [1] * len(self._functions)

    def __enter__(self) -> None:
        for i, (setter, getter) in enumerate(self._functions):
            self._saved[i] = getter()
            setter(1)

    def __exit__(self, *exc_info: object) -> None:
        for (setter, _), threads in zip(self._functions, self._saved):
            setter(threads)


# hidden states [n, H] -> logits of every row [n, vocab] float32, in a buffer the callee reuses (the next call
# rewrites it)
FullLogits = Callable[[np.ndarray], np.ndarray]


class NumpyHead:
    """Logits of allowed rows of the tied embedding, penalty, choice: one call per step.

    ``full_logits``: computes the full-vocabulary products instead of the float table (a weight-quantized
    bundle's int8 head graph), one row or a batched step's rows; the coordinate and listed rows still come
    from the table."""

    def __init__(self, embed_table: np.ndarray, sampling: Sampling, full_logits: FullLogits | None = None) -> None:
        if embed_table.ndim != 2:
            raise ValueError(f"embed_table must be [vocab, hidden], got shape {embed_table.shape}")
        self.table = embed_table
        self._full_logits = full_logits
        vocab = embed_table.shape[0]
        self.chooser = Chooser(vocab, sampling)
        self._logits = np.empty(vocab, dtype=np.float32)
        # listed ids (CHOICE, a COORD step's extra ids): their rows, seen flags and logits
        self._listed_rows = np.empty((LISTED_IDS, embed_table.shape[1]), dtype=embed_table.dtype)
        self._listed_seen = np.empty(LISTED_IDS, dtype=bool)
        self._listed_logits = np.empty(LISTED_IDS, dtype=np.float32)
        # the grammar hands out one cached tuple per state, so this holds a few entries
        self._index_arrays: dict[tuple[int, ...], np.ndarray] = {}
        self._one_blas_thread = _OneBlasThread()
        self._given: np.ndarray | None = None   # logits of every row for the next choose_full (set_full_logits)

    def reset(self, prompt_ids: np.ndarray) -> None:
        self.chooser.reset(prompt_ids)
        self._given = None

    def set_full_logits(self, logits: np.ndarray) -> None:
        """Every row's logits [vocab] for the next ``choose_full`` (which may modify them), instead of its own
        product: the batched decode loop computes them for all its sequences that need the full vocabulary
        in one product (the table read once for all of them)."""
        self._given = logits

    def full_products(self, hidden: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Every row's logits [n, vocab] for hidden states [n, H] in one product (what ``choose_full`` multiplies,
        for n sequences: the table or the head graph read once for all), in ``out`` [n, vocab] or in the head
        graph's buffer (valid until its next call); for ``set_full_logits``. No penalty: each head applies its own."""
        if self._full_logits is not None:
            return self._full_logits(hidden)
        return np.dot(hidden, self.table.T, out=out)

    def observe(self, token_id: int) -> None:
        self.chooser.observe(token_id)

    def choose_full(self, hidden: np.ndarray, blocked: np.ndarray | None = None) -> tuple[int, float]:
        """Every row of the vocabulary (exact mode, and FREE steps), except the rows where `blocked` is True."""
        given, self._given = self._given, None
        if given is not None:
            logits = given
        elif self._full_logits is not None:
            logits = self._full_logits(hidden[None])[0]
        else:
            logits = self._logits
            np.dot(self.table, hidden, out=logits)
        self.chooser.penalize(logits, self.chooser.seen)
        if blocked is not None:
            np.copyto(logits, -np.inf, where=blocked)
        return self.chooser.choose(logits)

    def choose_range(self, hidden: np.ndarray, start: int, stop: int, extra: tuple[int, ...] = ()) -> tuple[int, float]:
        """Rows start..stop-1 (the coordinate tokens), plus a few extra ids."""
        n = stop - start
        logits = self._logits[: n + len(extra)]
        with self._one_blas_thread:
            np.dot(self.table[start:stop], hidden, out=logits[:n])
            self.chooser.penalize(logits[:n], self.chooser.seen[start:stop])
            if extra:
                logits[n:] = self._listed(hidden, extra)
        index, prob = self.chooser.choose(logits)
        return (start + index if index < n else extra[index - n]), prob

    def choose_ids(self, hidden: np.ndarray, ids: tuple[int, ...]) -> tuple[int, float]:
        """A short list of ids (CHOICE steps)."""
        with self._one_blas_thread:
            logits = self._listed(hidden, ids)
        index, prob = self.chooser.choose(logits)
        return ids[index], prob

    def _listed(self, hidden: np.ndarray, ids: tuple[int, ...]) -> np.ndarray:
        """Penalized logits of `ids` (a view of a reused buffer): gathered rows @ hidden, no allocation."""
        rows = self._index_arrays.get(ids)
        if rows is None:
            if not ids:
                raise ValueError("expected at least one listed id")
            rows = self._index_arrays[ids] = np.array(ids, dtype=np.intp)
        k = len(ids)
        if k > self._listed_logits.shape[0]:
            self._listed_rows = np.empty((k, self.table.shape[1]), dtype=self.table.dtype)
            self._listed_seen = np.empty(k, dtype=bool)
            self._listed_logits = np.empty(k, dtype=np.float32)
        # mode="clip": take() buffers its output (a temporary) in the default mode="raise"
        table_rows = np.take(self.table, rows, axis=0, out=self._listed_rows[:k], mode="clip")
        seen = np.take(self.chooser.seen, rows, out=self._listed_seen[:k], mode="clip")
        logits = self._listed_logits[:k]
        np.dot(table_rows, hidden, out=logits)
        self.chooser.penalize(logits, seen)
        return logits
