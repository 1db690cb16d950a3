"""Structured decoding never writes an impossible answer: boxes well-ordered, each constrained
category answered at most once, and the None-or-box choice by the box's total probability (opt-in)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from rexedge.runtime.decode.grammar import make_grammar
from rexedge.runtime.decode.head import NumpyHead, Sampling
from rexedge.runtime.decode.loop import DecodeLoop, DecodingError
from rexedge.runtime.decode.phrases import phrase_table
from rexedge.runtime.request.tokenizer import Tokenizer
from test_loop import (HIDDEN, UNGUARDED, KeepGoing, RecordingBackend, ScriptedHead, phrases, request, run,
                       structural_table)

BOX_TASKS = ["detection", "visual_prompting", "gui_grounding", "ocr_box"]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoint)


@pytest.mark.parametrize("task", BOX_TASKS)
def test_structured_boxes_are_always_well_ordered(tokenizer: Tokenizer, task: str) -> None:
    """Random heads (a random hidden state each step): every box has x1 > x0 and y1 > y0, also where the
    head leans to the edges (<998>, <999> strong: x0 = <998> leaves x1 one choice)."""
    ids = tokenizer.ids
    boxes, at_edge = 0, 0
    for seed in range(30):
        rng = np.random.default_rng([seed, len(task)])
        table = structural_table(rng, ids, 2048, long_phrases=False)
        for bin_ in (998, 999, 0):
            table[ids.coord_start + bin_] *= rng.uniform(2.0, 6.0)
        table[[ids.none[0], ids.im_end]] *= 0.4   # more boxes per answer
        backend = RecordingBackend(tokenizer, table, lambda: rng.standard_normal(HIDDEN).astype(np.float32))
        loop = DecodeLoop(backend, backend.make_head(Sampling()), ids, mode="structured", limits=UNGUARDED)
        gen, _ = run(loop, tokenizer, task, rng)
        assert gen.stop_reason == "eos"
        for det in gen.detections:
            x0, y0, x1, y1 = det.bins
            assert x1 > x0 and y1 > y0, (seed, det.bins)
            assert det.coords[2] > det.coords[0] and det.coords[3] > det.coords[1]
        boxes += len(gen.detections)
        at_edge += sum(998 in d.bins[:2] for d in gen.detections)
    assert boxes > 30 and at_edge, (boxes, at_edge)


CATEGORIES = ["cup", "door handle", "door", "cupboard", "person"]


@pytest.mark.parametrize("task", ["detection", "pointing"])
@pytest.mark.parametrize("keep_going", [False, True])
def test_constrained_categories_are_answered_at_most_once(tokenizer: Tokenizer, task: str, keep_going: bool) -> None:
    """Random heads with constrained phrases (categories that prefix each other): no category twice. A head
    that never ends the answer by itself (``keep_going``) answers every category once and is then ended."""
    ids = tokenizer.ids
    encoded = [tokenizer.encode_text(c) for c in CATEGORIES]
    table = phrase_table(encoded, ids.object_ref_end)
    groups, several = 0, 0
    for seed in range(15):
        rng = np.random.default_rng([seed, len(task), keep_going])
        embed = structural_table(rng, ids, 2048, long_phrases=False)
        embed[ids.im_end] *= 0.1   # answers run on: repeats would be likely
        backend = RecordingBackend(tokenizer, embed, lambda: rng.standard_normal(HIDDEN).astype(np.float32))
        head = backend.make_head(Sampling())
        if keep_going:
            head = KeepGoing(head, ids, groups=10**6)
        loop = DecodeLoop(backend, head, ids, mode="structured", limits=UNGUARDED)
        prompt, image_embeds = request(ids, rng)
        grammar = make_grammar(task, ids, (320, 240), decode=tokenizer.decode)
        gen = loop.run(prompt, image_embeds, np.tile(np.arange(len(prompt)), (3, 1)), -9, grammar, table)
        assert gen.stop_reason == "eos", (seed, gen.stop_reason)
        answered = phrases(gen.token_ids, ids)
        assert all(p in encoded for p in answered)
        assert len(answered) == len({tuple(p) for p in answered}), f"seed {seed}: a category twice: {answered}"
        if keep_going:
            assert sorted(answered) == sorted(encoded)
        groups += len(answered)
        several += len(answered) > 1
    assert several >= 3 and groups >= 15 * (1 if not keep_going else len(CATEGORIES)), (several, groups)


# --------------------------------------------------------------------------- None or box: by the box's mass


class HeadOnFixedState(ScriptedHead):
    """Scripted CHOICE / phrase steps; coordinate steps go to a real NumpyHead at one fixed hidden state."""

    def __init__(self, script: list[int], real: NumpyHead, hidden: np.ndarray) -> None:
        super().__init__(script)
        self.real, self.hidden = real, hidden

    def choose_range(self, hidden: np.ndarray, start: int, stop: int, extra: tuple[int, ...] = ()) -> tuple[int, float]:
        self.calls.append("range")
        return self.real.choose_range(self.hidden, start, stop, extra)


def mass_case(tokenizer: Tokenizer, seed: int, none_over_coords: float, none_by_mass: bool):
    """A head where "None" is the single most likely token at the payload's start and the coordinate
    rows <0>..<998> hold ``1 / none_over_coords`` times its probability; <999> is the best coordinate
    but out of x0's range. Returns the generation and the coordinate logits."""
    ids = tokenizer.ids
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-0.5, 0.5, 1000)
    logits[999] = 1.5
    coords_mass = math.fsum(math.exp(v) for v in logits[:999])
    none_logit = math.log(none_over_coords * coords_mass)
    table = np.zeros((2048, HIDDEN), np.float32)
    table[ids.coord_start:ids.coord_start + 1000, 0] = logits
    table[ids.none[0], 0] = none_logit
    hidden = np.zeros(HIDDEN, np.float32)
    hidden[0] = 1.0
    cup = tokenizer.encode_text("cup")
    ends = [ids.box_end, ids.im_end] if none_by_mass and none_over_coords < 1 else [ids.im_end]
    backend = RecordingBackend(tokenizer, table, lambda: np.zeros(HIDDEN, np.float32))
    head = HeadOnFixedState([ids.object_ref_start, *cup, ids.object_ref_end, *ends],
                            NumpyHead(table, Sampling(repetition_penalty=1.0)), hidden)
    loop = DecodeLoop(backend, head, ids, mode="structured", limits=UNGUARDED, none_by_mass=none_by_mass)
    gen, grammar = run(loop, tokenizer, "detection", rng)
    assert not head.script, "the answer ended early"
    return gen, grammar, table[ids.coord_start:ids.coord_start + 1000, 0].astype(np.float64), float(
        table[ids.none[0], 0])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("none_over_coords", [0.6, 0.95, 1.05, 1.7])
def test_none_or_box_by_mass_against_a_hand_computed_decision(tokenizer: Tokenizer, seed: int,
                                                              none_over_coords: float) -> None:
    gen, grammar, coord, none_logit = mass_case(tokenizer, seed, none_over_coords, none_by_mass=True)
    # by hand, in float64 over the allowed rows: "None" and <0>..<998> (x0 leaves room for x1)
    p_none = math.exp(none_logit) / (math.exp(none_logit) + math.fsum(np.exp(coord[:999])))
    assert p_none > max(np.exp(coord[:999])) / (math.exp(none_logit) + math.fsum(np.exp(coord[:999])))
    if p_none >= 1 - p_none:
        assert gen.detections == [] and grammar.absent == ["cup"]
        return
    assert grammar.absent == [] and len(gen.detections) == 1
    # the box: x0, y0 the best of <0>..<998>; x1, y1 the best above them (<999>)
    best = int(np.argmax(coord[:999]))
    assert gen.detections[0].bins == (best, best, 999, 999)
    z_first = math.exp(none_logit) + math.fsum(np.exp(coord[:999]))
    probs = [math.exp(coord[best]) / z_first, math.exp(coord[best]) / math.fsum(np.exp(coord[:999]))]
    probs += [math.exp(coord[999]) / math.fsum(np.exp(coord[best + 1:]))] * 2
    expected_score = math.exp(sum(math.log(p) for p in probs) / 4)
    assert gen.detections[0].score == pytest.approx(expected_score, rel=1e-4)


@pytest.mark.parametrize("none_over_coords", [0.6, 1.7])
def test_by_default_the_single_most_likely_token_decides(tokenizer: Tokenizer, none_over_coords: float) -> None:
    gen, grammar, _, _ = mass_case(tokenizer, 7, none_over_coords, none_by_mass=False)
    assert gen.detections == [] and grammar.absent == ["cup"]


def test_none_by_mass_is_structured_only(tokenizer: Tokenizer) -> None:
    backend = RecordingBackend(tokenizer, np.zeros((2048, HIDDEN), np.float32), lambda: np.zeros(HIDDEN, np.float32))
    with pytest.raises(DecodingError, match="none_by_mass needs structured decoding"):
        DecodeLoop(backend, backend.make_head(Sampling()), tokenizer.ids, mode="exact", none_by_mass=True)
