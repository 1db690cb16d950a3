"""Forcing a response through the real decode loop, and timing each step by kind.

``ScriptedHead`` wraps a backend's real head (the ``Head`` protocol of
``rexedge.runtime.decode.head``): every ``choose_*`` the loop asks for runs the real head on the
real hidden state, so its cost is measured, and then answers the scenario's next token
instead of the head's choice. The token must be one the step allowed (a coordinate at a
coordinate step, one of the ids at a choice step), otherwise the scenario does not fit
the grammar and the run stops with an error. Forced tokens never reach the head; the loop
``observe``s every appended token, which is checked against the script too.

``TimedBackend`` wraps the backend the loop steps: each ``step`` is timed and recorded
with the kind of the choice whose token opens it (free / coord / choice, or forced when
the head was not asked: a step of forced tokens only), the head's time for that choice,
and how many of its tokens are forced (the loop sends the forced tokens that follow a
choice in the choice's own step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from rexedge.bench.scenarios import BenchError
from rexedge.runtime.decode.grammar import CHOICE, COORD, FORCED, FREE
from rexedge.runtime.decode.head import Head

FORCED_KIND = FORCED.label
STEP_KINDS = tuple(kind.label for kind in (FREE, COORD, CHOICE, FORCED))


class ScriptedHead:
    """A ``Head`` that asks the real head and answers the script's next token."""

    def __init__(self, inner: Head, script: Sequence[int]) -> None:
        self.inner = inner
        self.script = list(script)
        self._cursor = 0
        self._kind = FORCED_KIND
        self._head_s = 0.0
        if hasattr(inner, "set_full_logits"):   # the batched loop's shared full-vocabulary product reaches it
            self.set_full_logits, self.full_products = inner.set_full_logits, inner.full_products

    def take_choice(self) -> tuple[str, float]:
        """Kind and head seconds of the choice made since the last call (forced, 0.0 if none)."""
        kind, seconds = self._kind, self._head_s
        self._kind, self._head_s = FORCED_KIND, 0.0
        return kind, seconds

    @property
    def finished(self) -> bool:
        return self._cursor == len(self.script)

    def reset(self, prompt_ids: np.ndarray) -> None:
        self.inner.reset(prompt_ids)
        self._cursor = 0
        self.take_choice()

    def observe(self, token_id: int) -> None:
        expected = self._expected()
        if token_id != expected:
            raise BenchError(f"the loop appended token {token_id} at output position {self._cursor}, the scenario's "
                             f"response has {expected} there: the response does not fit the task's grammar")
        self.inner.observe(token_id)
        self._cursor += 1

    def choose_full(self, hidden: np.ndarray, blocked: np.ndarray | None = None) -> tuple[int, float]:
        start = time.perf_counter()
        _, prob = self.inner.choose_full(hidden, blocked)
        token, prob = self._answer(FREE.label, start, prob)
        if blocked is not None and blocked[token]:
            raise BenchError(f"the scenario's token {token} at output position {self._cursor} is blocked at this "
                             f"free step (a coordinate or special token inside a phrase, or a padding row)")
        return token, prob

    def choose_range(self, hidden: np.ndarray, start: int, stop: int, extra: tuple[int, ...] = ()) -> tuple[int, float]:
        began = time.perf_counter()
        _, prob = self.inner.choose_range(hidden, start, stop, extra)
        token, prob = self._answer(COORD.label, began, prob)
        if not (start <= token < stop or token in extra):
            raise BenchError(f"the scenario's token {token} at output position {self._cursor} is not allowed at a "
                             f"coordinate step ({start}..{stop - 1} or {list(extra)})")
        return token, prob

    def choose_ids(self, hidden: np.ndarray, ids: tuple[int, ...]) -> tuple[int, float]:
        start = time.perf_counter()
        _, prob = self.inner.choose_ids(hidden, ids)
        token, prob = self._answer(CHOICE.label, start, prob)
        if token not in ids:
            raise BenchError(f"the scenario's token {token} at output position {self._cursor} is not one of the "
                             f"choice step's ids {list(ids)}")
        return token, prob

    def _answer(self, kind: str, start: float, prob: float) -> tuple[int, float]:
        self._head_s += time.perf_counter() - start
        self._kind = kind
        return self._expected(), prob

    def _expected(self) -> int:
        if self._cursor >= len(self.script):
            raise BenchError(f"the loop went on past the scenario's {len(self.script)} tokens (no stop at the end?)")
        return self.script[self._cursor]


@dataclass(frozen=True)
class StepRecord:
    kind: str          # free | coord | choice: the choice whose token opens the step; forced: no choice
    tokens: int        # tokens appended by this backend step
    head_s: float      # the head's time for that choice
    backend_s: float   # backend.step
    context: int       # tokens in the cache before the step
    forced: int = 0    # of ``tokens``, those appended without the head (the grammar's forced tokens)


class TimedBackend:
    """Forwards everything to ``backend``; records each ``step`` as a ``StepRecord``."""

    def __init__(self, backend: Any, head: ScriptedHead) -> None:
        self._backend = backend
        self._head = head
        self.records: list[StepRecord] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        self.records = []
        return self._backend.prefill(inputs_embeds, position_ids)

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        kind, head_s = self._head.take_choice()
        context = self._backend.cache_length
        start = time.perf_counter()
        hidden = self._backend.step(token_ids, position_ids)
        backend_s = time.perf_counter() - start
        # a step holds at most one chosen token, its first; the rest are forced
        forced = len(token_ids) - (kind != FORCED_KIND)
        self.records.append(StepRecord(kind, len(token_ids), head_s, backend_s, context, forced))
        return hidden
