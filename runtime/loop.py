"""The decode loop, written once for every backend.

A backend only encodes images, prefills and steps (it owns the KV cache); the head and
the choice of token run here (or, on a GPU backend, in the backend's own head). Two modes:

- ``exact``: every step over the full vocabulary, greedy (or the wrapper's sampling),
  repetition penalty over prompt and output, stop at <|im_end|>: the reference's tokens.
- ``structured`` (default): the output grammar says what may come next. Phrase steps
  exclude coordinate and special tokens, COORD steps multiply only the 1,000
  coordinate rows of the head, CHOICE steps a handful of rows,
  FORCED tokens are appended several at a time in one backend step (jump-forward), and
  the output is always in the task's grammar.

The grammar runs in both modes, so detections (and the guards that look at them) are
the same machinery either way. Guards: max_new_tokens, a cap on boxes, four zero
coordinates in a row, a box that repeats one already produced, a full KV cache. Each
box's score is the geometric mean of its coordinates' probabilities under the softmax
of the step that chose them (the coordinate rows in structured mode, the whole
vocabulary in exact mode).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from rexedge.runtime.backends.base import Backend
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.grammar import CHOICE, COORD, DONE, FORCED, FREE
from rexedge.runtime.head import Head
from rexedge.runtime.phrases import PhraseTable
from rexedge.runtime.results import Detection
from rexedge.runtime.tokenizer import TokenIds

MODES = ("exact", "structured")


class DecodingError(RexEdgeError, ValueError):
    """A decoding mode or limit that cannot be used."""


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 4096
    max_boxes: int = 1000
    stop_on_zero_box: bool = True       # "<0><0><0><0>": what the evaluation scripts stop on
    stop_on_repeated_box: bool = True   # runaway outputs repeat boxes they already gave

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_boxes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DecodingError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class Generation:
    token_ids: list[int]
    detections: list[Detection]
    stop_reason: str                    # eos | grammar_done | max_new_tokens | max_boxes | zero_box | repeated_box | context_full
    prefill_s: float = 0.0
    decode_s: float = 0.0
    backend_s: float = 0.0              # time inside backend.step (decode_s minus this is host overhead)
    steps: dict[str, int] = field(default_factory=dict)   # backend steps by kind


class DecodeLoop:
    """Drives one backend and one head; reused across images (buffers are allocated once)."""

    def __init__(self, backend: Backend, head: Head, ids: TokenIds, mode: str = "structured",
                 limits: Limits = Limits()) -> None:
        if mode not in MODES:
            raise DecodingError(f"unknown decoding mode {mode!r}; expected one of {', '.join(MODES)}")
        self.backend, self.head, self.ids, self.mode, self.limits = backend, head, ids, mode, limits
        self._positions = np.empty((3, 64), dtype=np.int64)
        self._token = np.empty(64, dtype=np.int64)
        self._offsets = np.arange(64, dtype=np.int64)
        self._stop_ids = {ids.im_end, ids.endoftext}
        self._blocked_by_allowed: dict[tuple[int, ...], np.ndarray] = {}

    def _text_blocked(self, allowed: tuple[int, ...]) -> np.ndarray:
        """Rows a phrase may not use: added tokens (coordinates, specials) and padding rows, except ``allowed``."""
        blocked = self._blocked_by_allowed.get(allowed)
        if blocked is None:
            blocked = np.zeros(self.backend.embed_table.shape[0], dtype=bool)
            blocked[list(self.backend.tokenizer.added_tokens.values())] = True
            blocked[self.backend.tokenizer.vocab_size:] = True
            blocked[list(allowed)] = False
            self._blocked_by_allowed[allowed] = blocked
        return blocked

    def _step(self, tokens: tuple[int, ...], cache_len: int, rope_delta: int) -> np.ndarray:
        k = len(tokens)
        self._token[:k] = tokens
        # decode positions: cache position + rope_delta, the same on all three streams
        np.add(self._offsets[:k], cache_len + rope_delta, out=self._positions[0, :k])
        self._positions[1:, :k] = self._positions[0, :k]
        return self.backend.step(self._token[:k], self._positions[:, :k])

    def run(self, prompt_ids: np.ndarray, image_embeds: np.ndarray, positions: np.ndarray, rope_delta: int,
            grammar, phrases: PhraseTable | None = None) -> Generation:
        """Prefill the prompt (image embeddings at its image tokens) and decode under ``grammar``.

        ``phrases`` (structured mode): constrain each phrase to one of these token sequences
        (``rexedge.runtime.phrases``); None keeps phrases free text.
        """
        ids, limits, backend, head = self.ids, self.limits, self.backend, self.head
        t0 = time.perf_counter()
        embeds = backend.embed_table[prompt_ids].astype(np.float32)
        image_rows = np.flatnonzero(prompt_ids == ids.image_pad)
        if image_rows.shape[0] != image_embeds.shape[0]:
            raise ValueError(f"prompt has {image_rows.shape[0]} image tokens but the image gave {image_embeds.shape[0]} embeddings")
        embeds[image_rows] = image_embeds
        hidden = backend.prefill(embeds, positions)
        head.reset(prompt_ids)
        prefill_s = time.perf_counter() - t0

        out: list[int] = []
        coord_probs: list[float] = []
        detections: list[Detection] = []
        seen_boxes: set[tuple[str, tuple[int, ...]]] = set()
        steps = {"free": 0, "coord": 0, "choice": 0, "forced": 0}
        zeros_in_a_row = 0
        phrase: tuple[int, ...] = ()        # ids of the phrase being written (for `phrases`)
        backend_s = 0.0
        cache_len = len(prompt_ids)
        coord_start, coord_stop = ids.coord_start, ids.coord_start + ids.num_coords
        stop_reason = "max_new_tokens"
        t1 = time.perf_counter()
        while len(out) < limits.max_new_tokens:
            kind, allowed = grammar.next()
            in_phrase = self.mode == "structured" and kind == FREE and bool(allowed)
            if in_phrase and phrases is not None:
                forced, options = phrases.get(phrase, (True, allowed))
                if forced:
                    chosen = tuple((t, 1.0) for t in options[: limits.max_new_tokens - len(out)])
                    step_kind = "forced"
                else:
                    chosen = (head.choose_ids(hidden, options),)
                    step_kind = "choice"
            elif self.mode == "exact" or kind == FREE:
                # a FREE step with ids is phrase text: no coordinate or special token but those ids
                chosen = (head.choose_full(hidden, self._text_blocked(allowed) if in_phrase else None),)
                step_kind = "free"
            elif kind == COORD:
                chosen = (head.choose_range(hidden, coord_start, coord_stop, allowed),)
                step_kind = "coord"
            elif kind == CHOICE:
                chosen = (head.choose_ids(hidden, allowed),)
                step_kind = "choice"
            elif kind == FORCED:
                chosen = tuple((t, 1.0) for t in allowed[: limits.max_new_tokens - len(out)])
                step_kind = "forced"
            else:
                assert kind == DONE
                stop_reason = "grammar_done"
                break

            stop = None
            for token, prob in chosen:
                out.append(token)
                head.observe(token)
                if token == ids.object_ref_start:
                    phrase = ()
                elif in_phrase:
                    phrase += (token,)
                if coord_start <= token < coord_stop:
                    coord_probs.append(prob)
                    zeros_in_a_row = zeros_in_a_row + 1 if token == coord_start else 0
                else:
                    zeros_in_a_row = 0
                if limits.stop_on_zero_box and zeros_in_a_row >= 4:
                    # the reference stops on "<0><0><0><0>" and drops it (a stop string): a box it
                    # completes is all zeros and is not kept
                    stop = "zero_box"
                    break
                for det in grammar.advance(token):
                    key = (det.phrase, det.bins)
                    if limits.stop_on_repeated_box and key in seen_boxes:
                        stop = "repeated_box"
                        break
                    seen_boxes.add(key)
                    n = len(det.bins)
                    probs = coord_probs[-n:]
                    det.score = math.exp(sum(math.log(max(p, 1e-30)) for p in probs) / len(probs))
                    detections.append(det)
                if stop:
                    break
                if token in self._stop_ids:
                    stop = "eos"
                elif len(detections) >= limits.max_boxes:
                    stop = "max_boxes"
                if stop:
                    break
            if stop:
                stop_reason = stop
                break
            if len(out) >= limits.max_new_tokens:
                break  # nothing follows the last token: it needs no backend step
            appended = tuple(t for t, _ in chosen)
            if cache_len + len(appended) > backend.max_context:
                stop_reason = "context_full"
                break
            ts = time.perf_counter()
            hidden = self._step(appended, cache_len, rope_delta)
            backend_s += time.perf_counter() - ts
            cache_len += len(appended)
            steps[step_kind] += 1
        return Generation(token_ids=out, detections=detections, stop_reason=stop_reason, prefill_s=prefill_s,
                          decode_s=time.perf_counter() - t1, backend_s=backend_s, steps=steps)
