"""The decode loop with stand-in backends: structured output always in the task's grammar, and the guards.

Stand-ins, each recording every backend call: a backend whose every step returns a fresh
random hidden state over a random embedding table (so the head's choices are random and every
branch of the grammar is taken); a backend that mostly follows the grammar (so exact and
structured decoding can be compared); and a scripted head that answers a planned token
sequence (to force each guard). Then jump-forward on the real ort and torch CPU backends of the
tiny checkpoint, against the reference schedule where each forced run had a backend step of
its own.
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.decode.grammar import CHOICE, COORD, DONE, FORCED, FREE, make_grammar
from rexedge.runtime.decode.head import NumpyHead, Sampling
from rexedge.runtime.decode.loop import MAX_STEP_TOKENS, DecodeLoop, DecodingError, Generation, Limits
from rexedge.runtime.decode.phrases import PhrasesLeft
from rexedge.runtime.request.tokenizer import TokenIds, Tokenizer

HIDDEN = 16
IMAGE_SIZE = (317, 211)
ROPE_DELTA = -9
UNGUARDED = Limits(max_new_tokens=20000, max_boxes=10**6, stop_on_zero_box=False, stop_on_repeated_box=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoint)


class RecordingBackend:
    """Backend stand-in: checks what the loop sends, records every step, returns `hidden()`."""

    name = "recording"

    def __init__(self, tokenizer: Tokenizer, embed_table: np.ndarray, hidden: Callable[[], np.ndarray],
                 max_context: int = 100_000) -> None:
        self.tokenizer, self.embed_table, self.max_context = tokenizer, embed_table, max_context
        self.config, self.pixels = None, None
        self._hidden = hidden
        self.rope_delta = ROPE_DELTA
        self.steps: list[list[int]] = []
        self.cache_length = 0

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        assert inputs_embeds.dtype == np.float32 and position_ids.shape == (3, inputs_embeds.shape[0])
        self.prefilled = inputs_embeds.copy()
        self.cache_length, self.steps = inputs_embeds.shape[0], []
        return self._hidden()

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        k = token_ids.shape[0]
        assert self.cache_length + k <= self.max_context, "the loop overfilled the KV cache"
        # decode positions: cache position + rope_delta, the same on the three streams
        expected = np.arange(self.cache_length, self.cache_length + k) + self.rope_delta
        np.testing.assert_array_equal(position_ids, np.tile(expected, (3, 1)))
        self.steps.append(token_ids.tolist())
        self.cache_length += k
        return self._hidden()

    def make_head(self, sampling: Sampling) -> NumpyHead:
        return NumpyHead(self.embed_table, sampling)


def request(ids: TokenIds, rng: np.random.Generator, hidden: int = HIDDEN,
            image_tokens: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A prompt with an image (ordinary text around <|image_pad|> x n) and its image embeddings."""
    prompt = np.concatenate([rng.integers(0, 900, 5), [ids.vision_start], [ids.image_pad] * image_tokens,
                             [ids.vision_end], rng.integers(0, 900, 7)]).astype(np.int64)
    return prompt, rng.standard_normal((image_tokens, hidden)).astype(np.float32)


def run(loop: DecodeLoop, tokenizer: Tokenizer, task: str, rng: np.random.Generator) -> tuple[Generation, object]:
    prompt, image_embeds = request(tokenizer.ids, rng, loop.backend.embed_table.shape[1])
    grammar = make_grammar(task, tokenizer.ids, IMAGE_SIZE, decode=tokenizer.decode)
    positions = np.tile(np.arange(len(prompt)), (3, 1))
    gen = loop.run(prompt, image_embeds, positions, ROPE_DELTA, grammar)
    # the prompt's image rows were replaced by the image embeddings, the rest are table rows
    image_rows = prompt == tokenizer.ids.image_pad
    np.testing.assert_array_equal(loop.backend.prefilled[image_rows], image_embeds)
    np.testing.assert_array_equal(loop.backend.prefilled[~image_rows], loop.backend.embed_table[prompt[~image_rows]])
    return gen, grammar


# --------------------------------------------------------------------------- the documented grammar

COORD_TEXT = r"<(?:[0-9]|[1-9][0-9]|[1-9][0-9]{2})>"
GEOMETRY = {"detection": COORD_TEXT * 4, "pointing": COORD_TEXT * 2,
            "ocr_polygon": rf"(?:{COORD_TEXT}{COORD_TEXT}){{3,}}"}
# free text: anything but the tokens that delimit a phrase or end the answer
PHRASE = r"(?:(?!<\|object_ref_start\|>|<\|object_ref_end\|>|<\|im_end\|>|<\|endoftext\|>).)*"


def group_pattern(task: str) -> str:
    geom = GEOMETRY[task]
    return (rf"<\|object_ref_start\|>(?P<phrase>{PHRASE})<\|object_ref_end\|>"
            rf"<\|box_start\|>(?P<payload>None|{geom}(?:,{geom})*)<\|box_end\|>")


def response_pattern(task: str) -> re.Pattern:
    group = group_pattern(task).replace("?P<phrase>", "").replace("?P<payload>", "")
    return re.compile(rf"(?:{group}(?:, {group})*)?<\|im_end\|>", re.DOTALL)


def groups_of(text: str, task: str) -> list[tuple[str, list[tuple[int, ...]] | None]]:
    """(phrase, [bins of each geometry] or None) for every group of a grammatical answer."""
    found = []
    for match in re.finditer(group_pattern(task), text, re.DOTALL):
        payload = match["payload"]
        geoms = None if payload == "None" else [tuple(int(b) for b in re.findall(r"<(\d+)>", g))
                                                for g in payload.split(",")]
        found.append((match["phrase"], geoms))
    return found


def phrases(tokens: list[int], ids: TokenIds) -> list[list[int]]:
    """The ids of every phrase: between <|object_ref_start|> and <|object_ref_end|>."""
    starts = [i + 1 for i, t in enumerate(tokens) if t == ids.object_ref_start]
    return [tokens[i:tokens.index(ids.object_ref_end, i)] for i in starts]


def structural_table(rng: np.random.Generator, ids: TokenIds, vocab: int, long_phrases: bool) -> np.ndarray:
    """A random table where the grammar's decision tokens compete with the 1,000 coordinates or the
    ~1,000 text tokens (each scaled at random per seed), so every branch is taken now and then."""
    table = rng.standard_normal((vocab, HIDDEN)).astype(np.float32)
    for token in (ids.none[0], ids.comma, ids.box_end, ids.im_end):
        table[token] *= rng.uniform(2.0, 4.5)
    # a weak <|object_ref_end|> row lets phrases run to the 256-id cap
    table[ids.object_ref_end] *= 0.5 if long_phrases else rng.uniform(2.0, 4.5)
    return table


@pytest.mark.parametrize("task", ["detection", "pointing", "ocr_polygon"])
def test_structured_output_is_always_in_the_grammar(tokenizer: Tokenizer, task: str) -> None:
    ids = tokenizer.ids
    pattern = response_pattern(task)
    text_tokens = set(text_ids(tokenizer, 2048).tolist())
    seen = {"empty": 0, "none": 0, "groups>1": 0, "geoms>1": 0, "long_phrase": 0, "polygon>6": 0}
    for seed in range(40):
        rng = np.random.default_rng(1000 * seed + len(task))
        table = structural_table(rng, ids, 2048, long_phrases=seed % 4 == 0)
        backend = RecordingBackend(tokenizer, table, lambda: rng.standard_normal(HIDDEN).astype(np.float32))
        loop = DecodeLoop(backend, backend.make_head(Sampling()), ids, mode="structured", limits=UNGUARDED)
        gen, grammar = run(loop, tokenizer, task, rng)

        text = tokenizer.decode(gen.token_ids)
        assert gen.stop_reason == "eos"
        assert pattern.fullmatch(text), f"seed {seed}: not in the {task} grammar: {text!r}"
        groups = groups_of(text, task)
        # the loop's detections are the text's geometries, in order; "None" phrases are absent
        expected = [(phrase, bins) for phrase, geoms in groups for bins in geoms or ()]
        assert [(d.phrase, d.bins) for d in gen.detections] == expected
        assert grammar.absent == [phrase for phrase, geoms in groups if geoms is None]
        assert all(0 < d.score <= 1 for d in gen.detections)
        assert backend.cache_length == len(gen.token_ids) + len(backend.prefilled) - 1  # the end token is not run

        seen["empty"] += not groups
        seen["none"] += any(geoms is None for _, geoms in groups)
        seen["groups>1"] += len(groups) > 1
        seen["geoms>1"] += any(geoms and len(geoms) > 1 for _, geoms in groups)
        phrase_ids = phrases(gen.token_ids, ids)
        assert set().union(*phrase_ids) <= text_tokens, "a phrase holds a coordinate or special token"
        seen["long_phrase"] += [len(p) for p in phrase_ids].count(256)  # the cap closes the phrase
        seen["polygon>6"] += any(len(b) > 6 for _, geoms in groups for b in geoms or ())
    wanted = ["empty", "none", "groups>1", "geoms>1", "long_phrase"] + (["polygon>6"] if task == "ocr_polygon" else [])
    assert all(seen[k] for k in wanted), f"branches not exercised: {seen}"


def text_ids(tokenizer: Tokenizer, vocab: int) -> np.ndarray:
    """Ids of ordinary text: what a phrase may hold besides <|object_ref_end|> (no added token, no padding row)."""
    ordinary = np.ones(vocab, dtype=bool)
    ordinary[list(tokenizer.added_tokens.values())] = False
    ordinary[tokenizer.vocab_size:] = False
    return np.flatnonzero(ordinary)


def offered(kind, allowed: tuple[int, ...], token: int, ids: TokenIds, text: np.ndarray,
            coord_range: tuple[int, int]) -> bool:
    """Whether structured decoding allows `token` where next() said (kind, allowed) and coord_range() the
    coordinates (the documented grammar, boxes well-ordered)."""
    if kind == FREE:
        return not allowed or token in allowed or token in text
    if kind == COORD:
        return coord_range[0] <= token < coord_range[1] or token in allowed
    if kind == CHOICE:
        return token in allowed
    if kind == FORCED:
        return token == allowed[0]
    return False


class GrammarFollowingBackend(RecordingBackend):
    """A model that mostly follows the grammar: each hidden state points at a token the grammar allows
    after the tokens so far (97 times in 100) or at any token, drawn from a generator seeded by the
    whole output so far, so that two runs sharing a history see the same hidden states."""

    def __init__(self, tokenizer: Tokenizer, embed_table: np.ndarray, task: str, seed: int) -> None:
        super().__init__(tokenizer, embed_table, self._follow)
        self.task, self.seed, self.output = task, seed, []
        self.text = text_ids(tokenizer, embed_table.shape[0])

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        self.output = []
        return super().prefill(inputs_embeds, position_ids)

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        self.output += token_ids.tolist()
        return super().step(token_ids, position_ids)

    def _follow(self) -> np.ndarray:
        ids = self.tokenizer.ids
        rng = np.random.default_rng([self.seed, zlib.crc32(np.asarray(self.output, np.int64).tobytes())])
        grammar = make_grammar(self.task, ids, IMAGE_SIZE, impl="python", decode=self.tokenizer.decode)
        for token in self.output:
            grammar.advance(token)
        kind, allowed = grammar.next()
        if rng.random() < 0.03 or kind == DONE:
            target = int(rng.integers(0, self.embed_table.shape[0]))
        elif kind == FREE:
            target = allowed[0] if allowed and rng.random() < 0.3 else int(rng.choice(self.text))
        elif kind == COORD:
            target = int(rng.choice(allowed)) if allowed and rng.random() < 0.3 else int(
                rng.integers(*grammar.coord_range()))
        else:
            # CHOICE: mostly the first id (a new group, another geometry) so that answers run on
            target = allowed[int(rng.random() < 0.25)] if kind == CHOICE else allowed[0]
        row = self.embed_table[target]
        return (8 * row / np.linalg.norm(row) + 0.2 * rng.standard_normal(row.shape[0])).astype(np.float32)


@pytest.mark.parametrize("task", ["detection", "pointing", "ocr_polygon"])
def test_exact_and_structured_agree_while_the_model_follows_the_grammar(tokenizer: Tokenizer, task: str) -> None:
    """Both modes give the same tokens up to the first one the grammar does not allow (exact mode's
    token there is one the grammar refuses), with the penalty applied identically along the way."""
    ids = tokenizer.ids
    identical, long_agreements = 0, 0
    for seed in range(20):
        table = np.random.default_rng(seed).standard_normal((2048, 64)).astype(np.float32)
        tokens = {}
        for mode in ("exact", "structured"):
            backend = GrammarFollowingBackend(tokenizer, table, task, seed)
            loop = DecodeLoop(backend, backend.make_head(Sampling()), ids, mode=mode,
                              limits=Limits(max_new_tokens=150, stop_on_zero_box=False, stop_on_repeated_box=False))
            tokens[mode] = run(loop, tokenizer, task, np.random.default_rng(seed))[0].token_ids
        exact, structured = tokens["exact"], tokens["structured"]
        split = next((i for i, (a, b) in enumerate(zip(exact, structured)) if a != b), None)
        if split is None:
            assert exact == structured
            identical += 1
            continue
        grammar = make_grammar(task, ids, IMAGE_SIZE, impl="python", decode=tokenizer.decode)
        for token in structured[:split]:
            grammar.advance(token)
        kind, allowed = grammar.next()
        coords = grammar.coord_range()
        assert not offered(kind, allowed, exact[split], ids, backend.text, coords), (seed, split, kind, allowed)
        assert offered(kind, allowed, structured[split], ids, backend.text, coords)
        long_agreements += split >= 10
    assert identical and long_agreements, (identical, long_agreements)


# --------------------------------------------------------------------------- scripted head: the guards


class ScriptedHead:
    """Answers a planned token sequence; checks each token is one the loop offered at that step."""

    def __init__(self, script: list[int], probs: dict[int, float] | None = None) -> None:
        self.script, self.probs = list(script), probs or {}
        self.calls: list[str] = []
        self.observed: list[int] = []

    def reset(self, prompt_ids: np.ndarray) -> None:
        self.observed = []

    def observe(self, token_id: int) -> None:
        self.observed.append(token_id)

    def _next(self, kind: str, offered) -> tuple[int, float]:
        assert self.script, f"the script ran out at a {kind} step"
        token = self.script.pop(0)
        assert offered(token), f"{token} was not offered at this {kind} step"
        self.calls.append(kind)
        return token, self.probs.get(len(self.calls) - 1, 0.5)

    def choose_full(self, hidden: np.ndarray, blocked: np.ndarray | None = None) -> tuple[int, float]:
        return self._next("full", lambda t: blocked is None or not blocked[t])

    def choose_range(self, hidden: np.ndarray, start: int, stop: int, extra: tuple[int, ...] = ()) -> tuple[int, float]:
        return self._next("range", lambda t: start <= t < stop or t in extra)

    def choose_ids(self, hidden: np.ndarray, ids: tuple[int, ...]) -> tuple[int, float]:
        return self._next("ids", lambda t: t in ids)


Groups = list[tuple[list[int], list[tuple[int, ...]] | None]]


def answer(ids: TokenIds, groups: Groups) -> list[tuple[int, bool]]:
    """The tokens of an answer of `groups` (phrase ids, geometries or None), each marked True when
    the grammar forces it (<|box_start|>, the rest of "None" and <|box_end|>, ", " <|object_ref_start|>)."""
    tokens = [(ids.object_ref_start, False)]
    for index, (phrase, geoms) in enumerate(groups):
        if index:
            tokens += [(ids.comma, False), (ids.space, True), (ids.object_ref_start, True)]
        tokens += [(t, False) for t in phrase] + [(ids.object_ref_end, False), (ids.box_start, True)]
        if geoms is None:
            tokens += [(ids.none[0], False)] + [(t, True) for t in ids.none[1:]] + [(ids.box_end, True)]
            continue
        for j, bins in enumerate(geoms):
            if j:
                tokens.append((ids.comma, False))
            tokens += [(ids.coord_start + b, False) for b in bins]
        tokens.append((ids.box_end, False))
    return tokens + [(ids.im_end, False)]


def plan(ids: TokenIds, groups: Groups) -> list[int]:
    """What the head must choose for that answer (the loop appends the forced tokens)."""
    return [t for t, forced in answer(ids, groups) if not forced]


def full(ids: TokenIds, groups: Groups) -> list[int]:
    return [t for t, _ in answer(ids, groups)]


def scripted(tokenizer: Tokenizer, script: list[int], task: str = "detection", mode: str = "structured",
             limits: Limits = Limits(), max_context: int = 100_000,
             probs: dict[int, float] | None = None) -> tuple[Generation, RecordingBackend, ScriptedHead]:
    rng = np.random.default_rng(len(script))
    table = rng.standard_normal((2048, HIDDEN)).astype(np.float32)
    backend = RecordingBackend(tokenizer, table, lambda: np.zeros(HIDDEN, np.float32), max_context=max_context)
    head = ScriptedHead(script, probs)
    gen, _ = run(DecodeLoop(backend, head, tokenizer.ids, mode=mode, limits=limits), tokenizer, task, rng)
    return gen, backend, head


def cup(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode_text("cup")


def test_forced_tokens_ride_in_the_step_of_the_choice_before_them(tokenizer: Tokenizer) -> None:
    ids = tokenizer.ids
    dog = tokenizer.encode_text("door handle")
    groups = [(cup(tokenizer), [(10, 20, 30, 40), (1, 2, 3, 4)]), (dog, None), (dog + dog, [(5, 6, 7, 8)])]
    gen, backend, head = scripted(tokenizer, plan(ids, groups))
    assert gen.stop_reason == "eos" and not head.script
    # every generated token but the final <|im_end|> is run exactly once, in order
    assert [t for step in backend.steps for t in step] == gen.token_ids[:-1]
    assert gen.token_ids == full(ids, groups)
    # one step per chosen token, carrying the forced tokens that follow it: <|object_ref_end|> +
    # <|box_start|>, "None"'s first id + its rest + <|box_end|>, "," + " " <|object_ref_start|>
    marked = answer(ids, groups)
    starts = [i for i, (_, forced) in enumerate(marked) if not forced]
    expected = [[t for t, _ in marked[a:b]] for a, b in zip(starts, starts[1:])]
    assert backend.steps == expected
    assert [ids.object_ref_end, ids.box_start] in backend.steps and [ids.comma, ids.space, ids.object_ref_start] in backend.steps
    # no step of forced tokens alone; the steps of 6 forced runs (3 <|box_start|>, a "None" rest,
    # two separators) went into the steps of the choices before them
    assert gen.steps["forced"] == 0 and sum(gen.steps.values()) == len(backend.steps) == len(plan(ids, groups)) - 1
    assert gen.forced_tokens == sum(forced for _, forced in marked) == 3 + len(ids.none) + 2 * 2
    assert gen.steps["coord"] == 12 + 1  # 12 coordinates and "None"'s first id (an extra id of a coordinate step)
    # the loop asked the head the grammar's way: phrase text over the full head, coordinates restricted
    assert head.calls.count("range") == 12 + 1  # 12 coordinates and the None choice after <|box_start|>
    assert [(d.phrase, d.bins) for d in gen.detections] == [("cup", (10, 20, 30, 40)), ("cup", (1, 2, 3, 4)),
                                                            ("door handledoor handle", (5, 6, 7, 8))]
    assert head.observed == gen.token_ids


def test_exact_mode_asks_the_full_head_every_step(tokenizer: Tokenizer) -> None:
    ids = tokenizer.ids
    script = full(ids, [(cup(tokenizer), [(10, 20, 30, 40)]), (cup(tokenizer), None)])
    gen, backend, head = scripted(tokenizer, script, mode="exact")
    assert set(head.calls) == {"full"} and len(head.calls) == len(gen.token_ids) == len(backend.steps) + 1
    assert all(len(step) == 1 for step in backend.steps)
    assert gen.stop_reason == "eos" and [d.bins for d in gen.detections] == [(10, 20, 30, 40)]
    # <|endoftext|> ends an exact answer too
    gen, _, _ = scripted(tokenizer, [ids.object_ref_start, 5, 6, ids.endoftext, 7], mode="exact")
    assert gen.stop_reason == "eos" and gen.token_ids[-1] == ids.endoftext


def test_max_new_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.ids
    gen, backend, _ = scripted(tokenizer, plan(ids, [(list(range(100, 150)), None)]), limits=Limits(max_new_tokens=10))
    assert gen.stop_reason == "max_new_tokens" and len(gen.token_ids) == 10
    assert len(backend.steps) == 9  # the last token is not run: nothing follows it

    # the limit falls inside a forced run (", " <|object_ref_start|>): the run is cut there, and
    # the step that would carry "," and the cut run is not run (nothing follows it)
    groups = [(cup(tokenizer), None), (cup(tokenizer), None)]
    expected = full(ids, groups)
    cut = expected.index(ids.space) + 1
    gen, backend, _ = scripted(tokenizer, plan(ids, groups), limits=Limits(max_new_tokens=cut))
    assert gen.stop_reason == "max_new_tokens" and gen.token_ids == expected[:cut]
    assert [t for step in backend.steps for t in step] == expected[:cut - 2]
    assert backend.steps[-1][-1] == ids.box_end and gen.forced_tokens == 1 + len(ids.none) + 1


def test_max_boxes(tokenizer: Tokenizer) -> None:
    boxes = [(i, i + 1, i + 2, i + 3) for i in range(0, 50, 10)]
    gen, _, head = scripted(tokenizer, plan(tokenizer.ids, [(cup(tokenizer), boxes)]), limits=Limits(max_boxes=3))
    assert gen.stop_reason == "max_boxes"
    assert [d.bins for d in gen.detections] == boxes[:3]
    assert gen.token_ids[-1] == tokenizer.ids.coord_start + boxes[2][3]


@pytest.mark.parametrize("task, mode, geoms, kept", [
    # a zero box is out of order: only exact mode writes one (structured boxes have x1 > x0)
    ("detection", "exact", [(1, 2, 3, 4), (0, 0, 0, 0), (5, 6, 7, 8)], [(1, 2, 3, 4)]),   # not kept
    ("ocr_polygon", "structured", [(9, 9, 0, 0, 0, 0, 5, 5)], []),                         # inside a polygon
])
def test_four_zero_coordinates_in_a_row_stop(tokenizer: Tokenizer, task: str, mode: str, geoms: list,
                                             kept: list) -> None:
    script = (full if mode == "exact" else plan)(tokenizer.ids, [(cup(tokenizer), geoms)])
    gen, _, _ = scripted(tokenizer, script, task=task, mode=mode)
    assert gen.stop_reason == "zero_box" and [d.bins for d in gen.detections] == kept
    assert tokenizer.decode(gen.token_ids).endswith("<0><0><0><0>")
    gen, _, _ = scripted(tokenizer, script, task=task, mode=mode,
                         limits=Limits(stop_on_zero_box=False, stop_on_repeated_box=False))
    assert gen.stop_reason == "eos" and [d.bins for d in gen.detections] == geoms


def test_zeros_split_by_a_comma_are_no_stop(tokenizer: Tokenizer) -> None:
    # "<5><6><0><0>,<0><0><9><9>" does not hold the reference's stop string "<0><0><0><0>" (exact mode: the
    # first box is out of order)
    boxes = [(5, 6, 0, 0), (0, 0, 9, 9)]
    gen, _, _ = scripted(tokenizer, full(tokenizer.ids, [(cup(tokenizer), boxes)]), mode="exact")
    assert gen.stop_reason == "eos" and [d.bins for d in gen.detections] == boxes


def test_repeated_box_stops(tokenizer: Tokenizer) -> None:
    ids = tokenizer.ids
    other = tokenizer.encode_text("door handle")
    # the same bins under another phrase are no repeat
    script = plan(ids, [(cup(tokenizer), [(1, 2, 3, 4), (5, 6, 7, 8)]), (other, [(1, 2, 3, 4), (5, 6, 7, 8)]),
                        (cup(tokenizer), [(9, 9, 10, 10), (5, 6, 7, 8), (4, 4, 5, 5)])])
    gen, _, head = scripted(tokenizer, script)
    assert gen.stop_reason == "repeated_box"
    assert [(d.phrase, d.bins) for d in gen.detections] == [
        ("cup", (1, 2, 3, 4)), ("cup", (5, 6, 7, 8)), ("door handle", (1, 2, 3, 4)), ("door handle", (5, 6, 7, 8)),
        ("cup", (9, 9, 10, 10))]
    assert gen.token_ids[-1] == ids.coord_start + 8 and len(head.script) == 7  # stopped at the repeat's last bin
    gen, _, _ = scripted(tokenizer, script, limits=Limits(stop_on_repeated_box=False))
    assert gen.stop_reason == "eos" and len(gen.detections) == 7


def test_full_kv_cache_stops(tokenizer: Tokenizer) -> None:
    ids = tokenizer.ids
    script = plan(ids, [(list(range(100, 160)), None)])
    prompt_length = len(request(ids, np.random.default_rng(0))[0])
    gen, backend, _ = scripted(tokenizer, script, max_context=prompt_length + 5)
    assert gen.stop_reason == "context_full"
    assert backend.cache_length == prompt_length + 5 and len(gen.token_ids) == 6

    # a step that does not fit is not started: here "," with the forced ", " <|object_ref_start|>
    # after it (the tokens before " " fit, the three do not). The output holds the forced run,
    # as when "," had a step of its own and the run was the step that did not fit.
    groups = [(cup(tokenizer), None), (cup(tokenizer), None)]
    expected = full(ids, groups)
    room = expected.index(ids.space)
    gen, backend, _ = scripted(tokenizer, plan(ids, groups), max_context=prompt_length + room)
    assert gen.stop_reason == "context_full" and backend.cache_length == prompt_length + room - 1
    assert gen.token_ids == expected[:room + 2]
    # one slot less: "," alone would not fit either, and nothing after it is decided
    gen, backend, _ = scripted(tokenizer, plan(ids, groups), max_context=prompt_length + room - 1)
    assert gen.stop_reason == "context_full" and backend.cache_length == prompt_length + room - 1
    assert gen.token_ids == expected[:room]


def test_box_score_is_the_geometric_mean_of_its_coordinate_probabilities(tokenizer: Tokenizer) -> None:
    ids = tokenizer.ids
    polygon = (10, 11, 12, 13, 14, 15, 16, 17)
    script = plan(ids, [(cup(tokenizer), [polygon, (20, 21, 22, 23, 24, 25)])])
    rng = np.random.default_rng(9)
    probs = {i: float(p) for i, p in enumerate(rng.uniform(0.01, 1.0, len(script)))}
    gen, _, head = scripted(tokenizer, script, task="ocr_polygon", probs=probs)
    assert [d.bins for d in gen.detections] == [polygon, (20, 21, 22, 23, 24, 25)]
    coordinate_calls = [i for i, token in enumerate(script) if ids.is_coord(token)]
    for det, calls in zip(gen.detections, (coordinate_calls[:8], coordinate_calls[8:])):
        logs = [math.log(probs[i]) for i in calls]
        assert det.score == pytest.approx(math.exp(sum(logs) / len(logs)), rel=1e-12)


def test_bad_modes_and_limits_are_clear_errors(tokenizer: Tokenizer) -> None:
    backend = RecordingBackend(tokenizer, np.zeros((2048, HIDDEN), np.float32), lambda: np.zeros(HIDDEN, np.float32))
    with pytest.raises(DecodingError, match="unknown decoding mode 'greedy'; expected one of exact, structured"):
        DecodeLoop(backend, backend.make_head(Sampling()), tokenizer.ids, mode="greedy")
    for field in ("max_new_tokens", "max_boxes"):
        with pytest.raises(DecodingError, match=f"{field} must be a positive integer, got 0") as error:
            Limits(**{field: 0})
        assert isinstance(error.value, RexEdgeError)


# --------------------------------------------------------------------------- jump-forward: long runs


def test_a_forced_run_longer_than_a_step_continues_in_further_steps(tokenizer: Tokenizer) -> None:
    """A category of 150 ids after a one-id branch: the chosen first id and the forced rest (with
    <|object_ref_end|> <|box_start|>) go out in steps of at most MAX_STEP_TOKENS, in order."""
    from rexedge.runtime.decode.phrases import phrase_table

    ids = tokenizer.ids
    rng = np.random.default_rng(5)
    long_name = [int(t) for t in rng.integers(100, 900, 150)]
    table = phrase_table([[7] + long_name, [8]], ids.object_ref_end)
    groups = [([7] + long_name, [(1, 2, 3, 4)])]
    script = [ids.object_ref_start, 7, *(ids.coord_start + b for b in (1, 2, 3, 4)), ids.box_end, ids.im_end]
    backend = RecordingBackend(tokenizer, rng.standard_normal((2048, HIDDEN)).astype(np.float32),
                               lambda: np.zeros(HIDDEN, np.float32))
    loop = DecodeLoop(backend, ScriptedHead(script), ids, limits=Limits())
    prompt, image_embeds = request(ids, rng)
    grammar = make_grammar("detection", ids, IMAGE_SIZE, decode=tokenizer.decode)
    gen = loop.run(prompt, image_embeds, np.tile(np.arange(len(prompt)), (3, 1)), ROPE_DELTA, grammar, table)
    assert gen.stop_reason == "eos" and gen.token_ids == full(ids, groups)
    run = [7, *long_name, ids.object_ref_end, ids.box_start]   # one chosen id, 152 forced
    assert backend.steps[1:4] == [run[:MAX_STEP_TOKENS], run[MAX_STEP_TOKENS:2 * MAX_STEP_TOKENS],
                                  run[2 * MAX_STEP_TOKENS:]]
    assert gen.steps == {"free": 0, "coord": 4, "choice": 3, "forced": 2} and gen.forced_tokens == 152


def test_no_step_is_longer_than_the_cuda_backend_takes() -> None:
    from rexedge.runtime.backends.torch_cuda import MAX_APPEND

    assert MAX_STEP_TOKENS <= MAX_APPEND


# --------------------------------------------------------------------------- jump-forward on real backends


class Schedule:
    """A real backend behind the loop, recording its steps and splitting them into forced runs.

    Each step the loop sends is cut, by the documented grammar (the Python core) and the phrase
    table, into a chosen token and the forced runs after it (FORCED ids; a category's unique
    rest, among the categories not yet answered; <|im_end|> once all are). ``split=True`` is the reference: the backend is stepped on the schedule the loop had
    before forced tokens rode with the choice before them, each chosen token alone and each
    forced run alone. ``max_context`` (the capacity the loop sees) may be below the backend's."""

    def __init__(self, backend, task: str, phrases, split: bool, max_context: int | None = None) -> None:
        self.backend, self.task, self.phrases, self.split = backend, task, phrases, split
        self.max_context = max_context or backend.max_context
        self.tokenizer, self.embed_table, self.config = backend.tokenizer, backend.embed_table, backend.config

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        ids = self.tokenizer.ids
        self.grammar = make_grammar(self.task, ids, IMAGE_SIZE, impl="python", decode=self.tokenizer.decode)
        self.phrase: tuple[int, ...] = ()
        self.left = None if self.phrases is None else PhrasesLeft(self.phrases)
        self.received: list[list[int]] = []             # the steps the loop sent
        self.runs: list[tuple[list[int], bool]] = []    # (tokens, forced) of the old schedule
        self.pending = 0                                # ids of a forced run left for the next step
        self.continued: set[int] = set()                # runs that continue the one before (past a step's end)
        self.backend_steps = 0
        return self.backend.prefill(inputs_embeds, position_ids)

    def _segment(self) -> tuple[int, bool]:
        """Length of what comes next and whether it is forced (1, False: a chosen token)."""
        if self.pending:
            return self.pending, True
        kind, allowed = self.grammar.next()
        if kind == FREE and allowed and self.left is not None:
            forced, options = self.left.step(self.phrase, (True, allowed))
            return (len(options), True) if forced else (1, False)
        if kind == CHOICE and self.left is not None and self.left.exhausted and self.tokenizer.ids.im_end in allowed:
            return 1, True
        return (len(allowed), True) if kind == FORCED else (1, False)

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        assert self.backend.cache_length + token_ids.size <= self.max_context, "the loop overfilled the KV cache"
        self.received.append(token_ids.tolist())
        start = 0
        while start < token_ids.size:
            length, forced = self._segment()
            stop = min(start + length, token_ids.size)
            if self.pending:
                self.continued.add(len(self.runs))
            self.pending = length - (stop - start) if forced else 0
            self.runs.append((token_ids[start:stop].tolist(), forced))
            if self.split:
                hidden = self.backend.step(token_ids[start:stop].copy(), position_ids[:, start:stop].copy())
                self.backend_steps += 1
            for token in token_ids[start:stop].tolist():
                kind, allowed = self.grammar.next()
                if token == self.tokenizer.ids.object_ref_start:
                    self.phrase = ()
                elif kind == FREE and allowed:  # phrase text
                    self.phrase += (token,)
                    if self.left is not None and token == self.tokenizer.ids.object_ref_end:
                        self.left.answered(self.phrase)
                self.grammar.advance(token)
            start = stop
        if not self.split:
            hidden = self.backend.step(token_ids, position_ids)
            self.backend_steps += 1
        return hidden


@pytest.fixture(scope="module")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rexedge.export.bundle import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("loop") / "bundle", progress=False)


@pytest.fixture(scope="module", params=["ort", "torch"])
def real_model(request, tiny_bundle: Path, tiny_checkpoint: Path):
    from rexedge.runtime.api import RexOmni

    return RexOmni(tiny_bundle if request.param == "ort" else tiny_checkpoint, backend=request.param, max_context=1024)


class KeepGoing:
    """The real head, kept from ending the answer before its 4th group: at a choice that offers
    <|im_end|> it chooses among the other ids (a random tiny model mostly ends at once)."""

    def __init__(self, inner, ids: TokenIds, groups: int = 4) -> None:
        self.inner, self.ids, self.groups, self.seen = inner, ids, groups, 0
        self.choose_full, self.choose_range = inner.choose_full, inner.choose_range

    def reset(self, prompt_ids: np.ndarray) -> None:
        self.inner.reset(prompt_ids)
        self.seen = 0

    def observe(self, token_id: int) -> None:
        self.inner.observe(token_id)
        self.seen += token_id == self.ids.object_ref_start

    def choose_ids(self, hidden: np.ndarray, ids: tuple[int, ...]) -> tuple[int, float]:
        if self.seen < self.groups and self.ids.im_end in ids:
            ids = tuple(t for t in ids if t != self.ids.im_end)
        return self.inner.choose_ids(hidden, ids)


def decode(model, task: str, seed: int, constrain: bool, split: bool, limits: Limits,
           max_context: int | None = None) -> tuple[Generation, Schedule, int]:
    """One request of ``task`` on a random image through the real backend (wrapped in a ``Schedule``)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (int(rng.integers(40, 120)), int(rng.integers(40, 120)), 3), dtype=np.uint8)
    # the third category is longer than a step: with constrain, its rest continues in further steps
    long_name = " ".join(["door handle of the red cupboard"] * 14)
    model.constrain_phrases = constrain
    prepared = model.prepare(image, task, ["cup", "door handle", long_name], keypoint_type="person")
    schedule = Schedule(model.backend, task, prepared.phrases, split, max_context)
    loop = DecodeLoop(schedule, KeepGoing(model.backend.make_head(Sampling()), model.ids), model.ids, limits=limits)
    gen = loop.run(prepared.prompt_ids, model.backend.encode_image(prepared.image), prepared.positions,
                   prepared.rope_delta, prepared.grammar, prepared.phrases)
    return gen, schedule, len(prepared.prompt_ids)


CASES = [(task, constrain) for task in ("detection", "pointing") for constrain in (False, True)] + [("keypoint", False)]


def test_merged_steps_give_the_tokens_of_the_old_schedule(real_model) -> None:
    """Tokens, stop, boxes as with each forced run in a step of its own (the backends' hidden state
    after k tokens is the one after the same tokens in several steps, up to fp32 rounding); the
    backend steps went down by the number of forced runs that followed a chosen token."""
    limits = Limits(max_new_tokens=300)  # free phrases reach the 256-id cap: a forced <|object_ref_end|> <|box_start|>
    saved, continued = 0, 0
    for task, constrain in CASES:
        for seed in range(4):
            gen, merged, _ = decode(real_model, task, seed, constrain, split=False, limits=limits)
            ref, old, _ = decode(real_model, task, seed, constrain, split=True, limits=limits)
            assert gen.token_ids == ref.token_ids and gen.stop_reason == ref.stop_reason, (task, constrain, seed)
            assert [(d.phrase, d.bins) for d in gen.detections] == [(d.phrase, d.bins) for d in ref.detections]
            np.testing.assert_allclose([d.score for d in gen.detections], [d.score for d in ref.detections], rtol=1e-4)
            # the last token is never run: a forced <|im_end|> (every category answered) is not among the runs
            last_forced = gen.stop_reason == "eos" and merged.left is not None and merged.left.exhausted
            assert merged.runs == old.runs
            assert gen.forced_tokens == sum(len(t) for t, forced in old.runs if forced) + last_forced
            # a forced run follows a chosen token (or, past MAX_STEP_TOKENS, continues in a step of forced ids)
            forced_runs = sum(forced for _, forced in old.runs)
            assert merged.backend_steps == len(merged.received) == sum(gen.steps.values())
            assert merged.backend_steps - gen.steps["forced"] == old.backend_steps - forced_runs
            assert all(len(step) <= MAX_STEP_TOKENS for step in merged.received)
            sent = [t for step in merged.received for t in step]
            assert sent == gen.token_ids[:len(sent)] and len(sent) < len(gen.token_ids)  # the last run needs no step
            saved += forced_runs
            continued += gen.steps["forced"]
    assert saved > 20 and continued, (saved, continued)


def test_guards_inside_a_merged_step_on_a_real_backend(real_model) -> None:
    """max_new_tokens and a full KV cache landing anywhere in an answer full of forced runs: the
    output and stop reason of the old schedule, where the tokens of every run but the last were
    run and the last run was decided (chosen or forced) and then found not to fit."""
    unlimited = Limits(max_new_tokens=300)
    seed = next(s for s in range(20) if len(decode(real_model, "detection", s, True, True, unlimited)[0].token_ids) > 12)
    full_gen, old, prompt_length = decode(real_model, "detection", seed, True, True, unlimited)
    answer_ids = full_gen.token_ids
    assert full_gen.stop_reason == "eos" and any(forced for _, forced in old.runs)
    for n in range(1, len(answer_ids) + 1):
        gen, _, _ = decode(real_model, "detection", seed, True, False, Limits(max_new_tokens=n))
        assert gen.token_ids == answer_ids[:n]
        assert gen.stop_reason == ("eos" if n == len(answer_ids) else "max_new_tokens")
    # output length after each run of the old schedule (a run longer than a step is one run)
    ends = [end for i, end in enumerate(np.cumsum([len(tokens) for tokens, _ in old.runs]))
            if i + 1 not in old.continued]
    for room in range(0, int(ends[-1]) + 1):
        gen, merged, _ = decode(real_model, "detection", seed, True, False, unlimited, max_context=prompt_length + room)
        overflow = next((int(end) for end in ends if end > room), None)
        assert gen.token_ids == (answer_ids if overflow is None else answer_ids[:overflow]), room
        assert gen.stop_reason == ("eos" if overflow is None else "context_full")
        assert sum(len(step) for step in merged.received) <= room


def test_a_branch_point_wider_than_64_categories(tokenizer: Tokenizer) -> None:
    """constrain_phrases with 90 categories of distinct first ids: the real head chooses among all 90 at
    the branch point (its id buffers start at 64), and the answer's phrase is one of the categories."""
    from rexedge.runtime.decode.phrases import phrase_table

    ids = tokenizer.ids
    rng = np.random.default_rng(90)
    firsts = rng.choice(np.arange(100, 1900), 90, replace=False)
    categories = [[int(first), int(rng.integers(100, 1900))] for first in firsts]
    table = rng.standard_normal((2048, HIDDEN)).astype(np.float32)
    # a hidden state whose best rows are <|object_ref_start|> (over <|im_end|>), then some category
    hidden = table[ids.object_ref_start] * 5 + table[categories[37][0]] * 3
    backend = RecordingBackend(tokenizer, table, lambda: hidden)
    wide = []
    head = NumpyHead(table, Sampling())
    choose_ids = head.choose_ids
    head.choose_ids = lambda h, options: (wide.append(len(options)), choose_ids(h, options))[1]
    loop = DecodeLoop(backend, head, ids, limits=Limits(max_new_tokens=12))
    prompt, image_embeds = request(ids, rng)
    grammar = make_grammar("detection", ids, IMAGE_SIZE, decode=tokenizer.decode)
    gen = loop.run(prompt, image_embeds, np.tile(np.arange(len(prompt)), (3, 1)), ROPE_DELTA, grammar,
                   phrase_table(categories, ids.object_ref_end))
    assert 90 in wide
    start = gen.token_ids.index(ids.object_ref_start)
    assert gen.token_ids[start + 1:start + 3] in categories
    assert gen.token_ids[start + 3] == ids.object_ref_end
