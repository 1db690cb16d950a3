"""The decode loop, written once for every backend.

A backend only encodes images, prefills and steps (it owns the KV cache); the head and
the choice of token run here (or, on a GPU backend, in the backend's own head). Two modes:

- ``exact``: every step over the full vocabulary, greedy (or the wrapper's sampling),
  repetition penalty over prompt and output, stop at <|im_end|>: the reference's tokens.
- ``structured`` (default): the output grammar says what may come next. Phrase steps
  exclude coordinate and special tokens, no FREE step (phrase or the keypoint task's
  text) chooses a padding row of the embedding (no text), COORD steps multiply only the 1,000
  coordinate rows of the head, CHOICE steps a handful of rows, and the output is always
  in the task's grammar. FORCED tokens (what the grammar allows as the only
  continuation, e.g. <|object_ref_end|><|box_start|>, and with ``phrases`` the unique
  rest of a category) need no head: they ride in the backend step of the token chosen
  before them (jump-forward). One backend step = one chosen token + the forced tokens
  after it, because only the next choice needs a hidden state, the one after the last of
  them. A step appends at most ``MAX_STEP_TOKENS``; a longer run continues in further
  steps.

  Structured answers are never impossible: a box's coordinates come from the rows the grammar's
  ``coord_range()`` leaves (x0, y0 in <0>..<998>; x1 > x0, y1 > y0), and with ``phrases`` each
  category is answered at most once (``PhrasesLeft``; when all are answered the response ends).
  ``none_by_mass`` (structured, off by default): at the choice between "None" and a first
  coordinate the box wins when the coordinate rows' total probability exceeds "None"'s, and
  its first coordinate is the head's choice among the coordinate rows (greedy: the most likely);
  by default the single most likely token decides (a box's probability spread over many
  coordinates loses to a lone "None"). With sampling the rule overrides a sampled "None" that
  has less mass than the box.

Step accounting (``Generation.steps``): backend steps by the kind of the head's choice
that opened them (free / coord / choice); ``forced`` counts steps that hold forced tokens
only (the continuation of a run longer than ``MAX_STEP_TOKENS``).
``Generation.forced_tokens`` counts the forced tokens of the output.

Batching (``run_batch``, a backend with ``max_batch`` > 1): up to ``max_batch`` sequences in slots,
each with its own grammar, head (``heads``), guards and limits, stepped together by one backend call
per step; a finished sequence's slot takes the next request at once. A sequence decodes the tokens it
would decode alone. The rows whose next choice is over the full vocabulary share one head product.

The grammar runs in both modes, so detections (and the guards that look at them) are
the same machinery either way. Guards: max_new_tokens (counts every token, forced ones
too), a cap on boxes, four zero coordinates in a row, a box that repeats one already
produced, a full KV cache (a step whose tokens do not all fit is not run; the output ends
with the chosen token or forced run that first did not fit). Each box's
score is the geometric mean of its coordinates' probabilities under the softmax of the
step that chose them (the coordinate rows in structured mode, the whole vocabulary in
exact mode).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from rexedge.runtime.backends.base import MAX_STEP_TOKENS, Backend
from rexedge.runtime.decode.grammar import CHOICE, COORD, DONE, FORCED, FREE, NextKind
from rexedge.runtime.decode.head import Head
from rexedge.runtime.decode.phrases import PhrasesLeft, PhraseTable
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.encode import embed_prompt
from rexedge.runtime.request.tokenizer import TokenIds
from rexedge.runtime.results.detections import Detection

K = TypeVar("K")
MODES = ("exact", "structured")
# MAX_STEP_TOKENS (backends.base): the most tokens one backend step appends: the loop's host buffers; the
# CUDA backend sizes its jump-forward buffer (MAX_APPEND) from it, batch backends their KV padding room.


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
    steps: dict[str, int] = field(default_factory=dict)   # backend steps by the kind of the choice that opened them
    forced_tokens: int = 0              # output tokens appended without the head


class _Answer:
    """The tokens decoded so far and what the guards watch: boxes, their scores, zeros, the phrase."""

    def __init__(self, ids: TokenIds, grammar, limits: Limits, stop_ids: set[int]) -> None:
        self.ids, self.grammar, self.limits, self.stop_ids = ids, grammar, limits, stop_ids
        self.tokens: list[int] = []
        self.detections: list[Detection] = []
        self.phrase: tuple[int, ...] = ()   # ids of the phrase being written (for the phrase table)
        self.forced = 0                     # tokens appended without the head
        self._coord_probs: list[float] = []
        self._seen_boxes: set[tuple[str, tuple[int, ...]]] = set()
        self._zeros_in_a_row = 0

    def append(self, token: int, prob: float, in_phrase: bool) -> str | None:
        """Add one token (``prob``: its probability when chosen); the stop reason it triggers, if any."""
        ids, limits = self.ids, self.limits
        self.tokens.append(token)
        if token == ids.object_ref_start:
            self.phrase = ()
        elif in_phrase:
            self.phrase += (token,)
        if ids.coord_start <= token < ids.coord_start + ids.num_coords:
            self._coord_probs.append(prob)
            self._zeros_in_a_row = self._zeros_in_a_row + 1 if token == ids.coord_start else 0
        else:
            self._zeros_in_a_row = 0
        if limits.stop_on_zero_box and self._zeros_in_a_row >= 4:
            # the reference stops on "<0><0><0><0>" and drops it (a stop string): a box it
            # completes is all zeros and is not kept
            return "zero_box"
        for det in self.grammar.advance(token):
            key = (det.phrase, det.bins)
            if limits.stop_on_repeated_box and key in self._seen_boxes:
                return "repeated_box"
            self._seen_boxes.add(key)
            probs = self._coord_probs[-len(det.bins):]
            det.score = math.exp(sum(math.log(max(p, 1e-30)) for p in probs) / len(probs))
            self.detections.append(det)
        if token in self.stop_ids:
            return "eos"
        if len(self.detections) >= limits.max_boxes:
            return "max_boxes"
        return None


@dataclass(frozen=True, eq=False)
class SequenceInput:
    """One sequence for ``DecodeLoop.run_batch``: what ``DecodeLoop.run`` takes."""

    prompt_ids: np.ndarray
    image_embeds: np.ndarray
    positions: np.ndarray
    rope_delta: int
    grammar: object
    phrases: PhraseTable | None = None
    limits: Limits | None = None       # this sequence's guards; None: the loop's
    # a sequence whose start put its prompt in the backend itself (branches of a shared prefill): the slot it
    # used (the one run_batch gives it) and the hidden state after its prompt; image_embeds are then unused
    slot: int | None = None
    hidden: object = None   # the backend's hidden state (a host array, or a device tensor on a GPU backend)


class _Live:
    """A sequence in a slot of ``run_batch``: its answer, head, cache length and the run it is appending."""

    def __init__(self, key: object, inp: SequenceInput, head: Head, answer: _Answer, phrases: PhrasesLeft | None,
                 hidden: np.ndarray, prefill_s: float) -> None:
        self.key, self.grammar, self.head, self.answer, self.phrases = key, inp.grammar, head, answer, phrases
        self.rope_delta, self.cache_len, self.hidden = inp.rope_delta, len(inp.prompt_ids), hidden
        self.prefill_s, self.start = prefill_s, time.perf_counter()
        self.steps = {kind.label: 0 for kind in (FREE, COORD, CHOICE, FORCED)}
        self.backend_s = 0.0
        self.kind: NextKind = FORCED
        self.pending: list[int] = []   # tokens of the current run not yet stepped
        self.first_chunk = True

    def generation(self, stop_reason: str) -> Generation:
        return Generation(token_ids=self.answer.tokens, detections=self.answer.detections, stop_reason=stop_reason,
                          prefill_s=self.prefill_s, decode_s=time.perf_counter() - self.start,
                          backend_s=self.backend_s, steps=self.steps, forced_tokens=self.answer.forced)


class DecodeLoop:
    """Drives one backend and one head; reused across images (buffers are allocated once).

    ``heads``: one head per slot for ``run_batch`` (a batch backend's ``max_batch`` of them; each keeps its
    sequence's seen-token record and sampling state); by default ``[head]``, one sequence at a time."""

    def __init__(self, backend: Backend, head: Head, ids: TokenIds, mode: str = "structured",
                 limits: Limits = Limits(), none_by_mass: bool = False, heads: list[Head] | None = None) -> None:
        if mode not in MODES:
            raise DecodingError(f"unknown decoding mode {mode!r}; expected one of {', '.join(MODES)}")
        if none_by_mass and mode != "structured":
            raise DecodingError("none_by_mass needs structured decoding; exact mode stays the reference's greedy")
        self.backend, self.head, self.ids, self.mode, self.limits = backend, head, ids, mode, limits
        self.none_by_mass = none_by_mass
        self.heads = heads or [head]
        if len(self.heads) > 1 and getattr(backend, "max_batch", 1) < len(self.heads):
            raise DecodingError(f"{len(self.heads)} heads (slots) but the {backend.name} backend steps at most "
                                f"{getattr(backend, 'max_batch', 1)} sequence(s) together")
        self._positions = np.empty((3, MAX_STEP_TOKENS), dtype=np.int64)
        self._token = np.empty(MAX_STEP_TOKENS, dtype=np.int64)
        self._offsets = np.arange(MAX_STEP_TOKENS, dtype=np.int64)
        self._stop_ids = {ids.im_end, ids.endoftext}
        self._blocked_by_allowed: dict[tuple[int, ...] | None, np.ndarray] = {}
        self._batch_logits: np.ndarray | None = None   # run_batch's full-vocabulary rows (made on first use)

    def _blocked(self, allowed: tuple[int, ...], in_phrase: bool) -> np.ndarray:
        """Rows a structured FREE step may not use: the padding rows (no text) always; in a phrase also
        the added tokens (coordinates, specials), except ``allowed``."""
        key = allowed if in_phrase else None
        blocked = self._blocked_by_allowed.get(key)
        if blocked is None:
            tokenizer = self.backend.tokenizer
            blocked = ~tokenizer.has_text(self.backend.embed_table.shape[0])
            if in_phrase:
                blocked[list(tokenizer.added_tokens.values())] = True
                blocked[list(allowed)] = False
            self._blocked_by_allowed[key] = blocked
        return blocked

    def _what_next(self, grammar, phrases: PhrasesLeft | None,
                   phrase: tuple[int, ...]) -> tuple[NextKind, tuple[int, ...], bool]:
        """(kind, ids, in_phrase): DONE; FORCED (ids follow in order); or the head chooses at a FREE
        (ids: what a phrase may use besides text, or () for anything), COORD or CHOICE step."""
        kind, allowed = grammar.next()
        if kind == DONE:
            return DONE, (), False
        if self.mode == "exact":
            return FREE, (), False
        if kind == FREE and allowed:
            # a FREE step with ids is phrase text: no coordinate or special token but those ids
            if phrases is not None:
                forced, options = phrases.step(phrase, (True, allowed))
                return (FORCED if forced else CHOICE), options, True
            return FREE, allowed, True
        if phrases is not None and phrases.exhausted and kind == CHOICE and self.ids.im_end in allowed:
            return FORCED, (self.ids.im_end,), False   # every category answered: no group may follow
        return kind, allowed, False

    def _choose(self, grammar, kind: NextKind, allowed: tuple[int, ...], in_phrase: bool,
                hidden: np.ndarray, head: Head) -> tuple[int, float]:
        ids = self.ids
        if kind == COORD:
            start, stop = grammar.coord_range()
            token, prob = head.choose_range(hidden, start, stop, allowed)
            if self.none_by_mass and allowed == (ids.none[0],) and token == ids.none[0] and prob < 0.5:
                # the coordinate rows hold 1 - prob > prob: the box wins, at its most likely first coordinate;
                # that coordinate's probability among all rows = its share of the coordinates x their mass
                token, share = head.choose_range(hidden, start, stop)
                prob = share * (1.0 - prob)
            return token, prob
        if kind == CHOICE:
            return head.choose_ids(hidden, allowed)
        # exact mode is the reference's full vocabulary, padding rows included
        return head.choose_full(hidden, None if self.mode == "exact" else self._blocked(allowed, in_phrase))

    def _next_run(self, grammar, phrases: PhrasesLeft | None, answer: _Answer, hidden: np.ndarray,
                  room: int, head: Head) -> tuple[NextKind, list[int], str | None]:
        """Decide the tokens of the next backend step, adding each to ``answer``: the head's choice at
        ``hidden`` (unless the grammar forces what comes first), then every forced token after it.

        Returns (step kind, tokens, stop reason or None). ``room``: KV slots left; once the tokens
        so far overflow it no forced run is added, so the output ends with the run (a chosen token,
        or one forced run) that first did not fit."""
        step_kind, tokens = FORCED, []
        while len(answer.tokens) < answer.limits.max_new_tokens:
            kind, allowed, in_phrase = self._what_next(grammar, phrases, answer.phrase)
            if kind == DONE:
                return step_kind, tokens, "grammar_done"
            if kind == FORCED:
                # a run that ends the response (every category answered: <|im_end|>) needs no KV slot
                if len(tokens) > room and allowed[-1] not in self._stop_ids:
                    return step_kind, tokens, None
                new = [(t, 1.0) for t in allowed[: answer.limits.max_new_tokens - len(answer.tokens)]]
                answer.forced += len(new)
            elif tokens:
                return step_kind, tokens, None   # this choice needs the hidden state after `tokens`
            else:
                step_kind, new = kind, [self._choose(grammar, kind, allowed, in_phrase, hidden, head)]
            for token, prob in new:
                tokens.append(token)
                head.observe(token)
                stop = answer.append(token, prob, in_phrase)
                if phrases is not None and in_phrase and token == self.ids.object_ref_end:
                    phrases.answered(answer.phrase)
                if stop:
                    return step_kind, tokens, stop
        return step_kind, tokens, "max_new_tokens"   # nothing follows the last token: it needs no step

    def _step(self, tokens: list[int], cache_len: int, rope_delta: int) -> np.ndarray:
        k = len(tokens)
        self._token[:k] = tokens
        # decode positions: cache position + rope_delta, the same on all three streams
        np.add(self._offsets[:k], cache_len + rope_delta, out=self._positions[0, :k])
        self._positions[1:, :k] = self._positions[0, :k]
        return self.backend.step(self._token[:k], self._positions[:, :k])

    def run(self, prompt_ids: np.ndarray, image_embeds: np.ndarray, positions: np.ndarray, rope_delta: int,
            grammar, phrases: PhraseTable | None = None, limits: Limits | None = None) -> Generation:
        """Prefill the prompt (image embeddings at its image tokens) and decode under ``grammar``.

        ``phrases`` (structured mode): constrain each phrase to one of these token sequences
        (``rexedge.runtime.decode.phrases``), each answered at most once; None keeps phrases free text.
        ``limits``: this sequence's guards instead of the loop's.
        """
        ids, backend = self.ids, self.backend
        t0 = time.perf_counter()
        embeds = embed_prompt(backend.embed_table, prompt_ids, image_embeds, ids.image_pad)
        hidden = backend.prefill(embeds, positions)
        self.head.reset(prompt_ids)
        prefill_s = time.perf_counter() - t0

        answer = _Answer(ids, grammar, limits or self.limits, self._stop_ids)
        phrases_left = None if phrases is None or self.mode == "exact" else PhrasesLeft(phrases)
        steps = {kind.label: 0 for kind in (FREE, COORD, CHOICE, FORCED)}
        backend_s = 0.0
        cache_len = len(prompt_ids)
        t1 = time.perf_counter()
        while True:
            kind, tokens, stop_reason = self._next_run(grammar, phrases_left, answer, hidden,
                                                       backend.max_context - cache_len, self.head)
            if stop_reason is None and cache_len + len(tokens) > backend.max_context:
                stop_reason = "context_full"
            if stop_reason is not None:
                break
            ts = time.perf_counter()
            for start in range(0, len(tokens), MAX_STEP_TOKENS):
                chunk = tokens[start:start + MAX_STEP_TOKENS]
                hidden = self._step(chunk, cache_len, rope_delta)
                cache_len += len(chunk)
                steps[(kind if start == 0 else FORCED).label] += 1
            backend_s += time.perf_counter() - ts
        return Generation(token_ids=answer.tokens, detections=answer.detections, stop_reason=stop_reason,
                          prefill_s=prefill_s, decode_s=time.perf_counter() - t1, backend_s=backend_s, steps=steps,
                          forced_tokens=answer.forced)

    @property
    def max_batch(self) -> int:
        """How many sequences ``run_batch`` steps together."""
        return len(self.heads)

    def run_batch(self, requests: Iterable[tuple[K, Callable[[], SequenceInput]]]
                  ) -> Iterator[tuple[K, Generation | Exception]]:
        """Decode many sequences, up to ``max_batch`` at a time: (key, Generation) as each finishes, in the
        order they finish (continuous batching: a finished slot takes the next request at once).

        ``requests``: (key, start) pairs, read lazily; ``start()`` makes the sequence's input (encoding
        its image: it runs when a slot is free, between decode steps). An exception from ``start`` or
        from its prefill is that request's: it is yielded as (key, error) and the others go on (an error
        of a batched step, which holds every live sequence, is raised).

        Scheduling: before every step the free slots are filled, lowest first (so a step's rows are the
        first slots), each by its request's image encoding and a batch-1 prefill into that slot; then one
        ``step_batch`` call appends every live sequence's next run (its chosen token and the forced tokens
        after it): rows of different run lengths are padded to the longest (the backend may group them
        instead: ``ort`` does, see its SlotSession). With one slot this is ``run`` for each request in turn.

        Each sequence decodes as ``run`` would decode it alone (its own grammar, head, guards and stop
        reason); ``decode_s`` is its wall time from its first step to its end, shared with the others."""
        backend, ids = self.backend, self.ids
        if self.max_batch == 1:
            for key, start in requests:
                try:
                    inp = start()
                    generation = self.run(inp.prompt_ids, inp.image_embeds, inp.positions, inp.rope_delta,
                                          inp.grammar, inp.phrases, inp.limits)
                except Exception as e:  # this request's failure; the others go on
                    yield key, e
                else:
                    yield key, generation
            return
        slots: list[_Live | None] = [None] * self.max_batch
        pending = iter(requests)
        exhausted = False
        tokens = np.zeros((self.max_batch, MAX_STEP_TOKENS), np.int64)
        positions = np.zeros((3, self.max_batch, MAX_STEP_TOKENS), np.int64)
        counts = np.zeros(self.max_batch, np.int64)
        while True:
            for slot in range(self.max_batch):
                while slots[slot] is None and not exhausted:
                    item = next(pending, None)
                    if item is None:
                        exhausted = True
                        break
                    key, start = item
                    try:
                        slots[slot] = self._start(key, start(), slot)
                    except Exception as e:  # this request's failure; the others go on
                        yield key, e
            self._full_vocabulary_products(slots)
            # every live sequence decides its next run; those that end leave their slot
            for slot, live in enumerate(slots):
                if live is None or live.pending:
                    continue
                live.kind, live.pending, stop = self._next_run(live.grammar, live.phrases, live.answer, live.hidden,
                                                               backend.max_context - live.cache_len, live.head)
                live.first_chunk = True
                if stop is None and live.cache_len + len(live.pending) > backend.max_context:
                    stop = "context_full"
                if stop is not None:
                    slots[slot] = None
                    yield live.key, live.generation(stop)
            stepping = [slot for slot, live in enumerate(slots) if live is not None and live.pending]
            if not stepping:
                if exhausted and all(live is None for live in slots):
                    return
                continue
            rows = stepping[-1] + 1
            counts[:rows] = 0
            for slot in stepping:
                live = slots[slot]
                chunk = live.pending[:MAX_STEP_TOKENS]
                k = len(chunk)
                tokens[slot, :k] = chunk
                tokens[slot, k:] = chunk[-1]
                # decode positions: cache position + rope_delta, the same on all three streams (padding continues)
                positions[:, slot] = self._offsets + (live.cache_len + live.rope_delta)
                counts[slot] = k
            width = int(counts[:rows].max())
            for slot in range(rows):
                if counts[slot] == 0:   # a free slot below a live one: padding
                    tokens[slot, :width] = ids.im_end
                    positions[:, slot, :width] = self._offsets[:width]
            ts = time.perf_counter()
            hidden = backend.step_batch(tokens[:rows, :width], positions[:, :rows, :width], counts[:rows])
            elapsed = time.perf_counter() - ts
            for slot in stepping:
                live = slots[slot]
                k = int(counts[slot])
                live.hidden = hidden[slot]
                live.cache_len += k
                live.steps[(live.kind if live.first_chunk else FORCED).label] += 1
                live.first_chunk = False
                live.backend_s += elapsed
                del live.pending[:k]

    def _full_vocabulary_products(self, slots: list[_Live | None]) -> None:
        """The head rows of a batched step, grouped: the sequences whose next choice is over the whole
        vocabulary (exact mode, FREE steps) get their logits from one product ([n, H] x [H, vocab]: the
        table, or a quantized bundle's head graph, read once for all n; the heads' ``full_products``) through
        their head's ``set_full_logits``; the others (coordinates, a few choice ids) keep their own restricted
        product, so no row widens to the full vocabulary."""
        rows = []
        for live in slots:
            if (live is not None and not live.pending and hasattr(live.head, "set_full_logits")
                    and len(live.answer.tokens) < live.answer.limits.max_new_tokens
                    and self._what_next(live.grammar, live.phrases, live.answer.phrase)[0] == FREE):
                rows.append(live)
        if len(rows) < 2:
            return
        if self._batch_logits is None:
            self._batch_logits = np.empty((self.max_batch, self.backend.embed_table.shape[0]), np.float32)
        logits = rows[0].head.full_products(np.stack([live.hidden for live in rows]), self._batch_logits[:len(rows)])
        for live, row in zip(rows, logits):
            live.head.set_full_logits(row)

    def _start(self, key: object, inp: SequenceInput, slot: int) -> _Live:
        """Prefill ``inp`` into ``slot``; the live sequence, ready to choose its first token."""
        t0 = time.perf_counter()
        if inp.hidden is not None:
            if inp.slot != slot:
                raise DecodingError(f"a sequence prefilled into slot {inp.slot} was given slot {slot}")
            hidden = inp.hidden
        else:
            embeds = embed_prompt(self.backend.embed_table, inp.prompt_ids, inp.image_embeds, self.ids.image_pad)
            hidden = self.backend.prefill(embeds, inp.positions, slot=slot)
        head = self.heads[slot]
        head.reset(inp.prompt_ids)
        answer = _Answer(self.ids, inp.grammar, inp.limits or self.limits, self._stop_ids)
        phrases = None if inp.phrases is None or self.mode == "exact" else PhrasesLeft(inp.phrases)
        return _Live(key, inp, head, answer, phrases, hidden, time.perf_counter() - t0)
