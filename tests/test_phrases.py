"""Phrases constrained to the requested categories: the table and the decode loop with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexedge.runtime.decode.grammar import make_grammar
from rexedge.runtime.decode.head import Sampling
from rexedge.runtime.decode.loop import DecodeLoop
from rexedge.runtime.decode.phrases import phrase_table
from rexedge.runtime.request.tokenizer import Tokenizer
from test_loop import HIDDEN, UNGUARDED, RecordingBackend, groups_of, phrases, request, structural_table

CLOSE = 99


def walk(table: dict, choose) -> tuple[int, ...]:
    """Follow the table from the empty prefix to the closing id, choosing with `choose(prefix, options)`."""
    phrase: tuple[int, ...] = ()
    while not phrase or phrase[-1] != CLOSE:
        forced, ids = table[phrase]
        phrase += ids if forced else (choose(phrase, ids),)
    return phrase


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=6), min_size=1, max_size=8), st.randoms())
def test_every_walk_spells_a_phrase_and_every_phrase_is_reachable(phrase_list: list[list[int]], rnd) -> None:
    table = phrase_table(phrase_list, CLOSE)
    wanted = {tuple(p) + (CLOSE,) for p in phrase_list}
    # a random walk always ends in one of the phrases
    for _ in range(10):
        assert walk(table, lambda prefix, ids: rnd.choice(ids)) in wanted
    # and each phrase is reached by choosing its own next id at every branch
    for target in wanted:
        assert walk(table, lambda prefix, ids, t=target: _own_next(t, prefix, ids)) == target
    # branches offer two or more ids; forced runs are as long as they can be
    for prefix, (forced, ids) in table.items():
        continuations = {p[len(prefix)] for p in wanted if p[:len(prefix)] == prefix and len(p) > len(prefix)}
        if forced:
            assert len(continuations) == 1 and ids[0] in continuations
        else:
            assert set(ids) == continuations and len(ids) > 1


def _own_next(target: tuple[int, ...], prefix: tuple[int, ...], options: tuple[int, ...]) -> int:
    assert target[:len(prefix)] == prefix and target[len(prefix)] in options
    return target[len(prefix)]


def test_a_category_that_prefixes_another_is_a_branch() -> None:
    table = phrase_table([[1, 2], [1, 2, 3], [4]], CLOSE)
    assert table[()] == (False, (1, 4))
    assert table[(1,)] == (True, (2,))          # "1 2" is shared: appended at once
    assert table[(1, 2)] == (False, (3, CLOSE))
    assert table[(4,)] == (True, (CLOSE,))
    with pytest.raises(ValueError, match="at least one non-empty phrase"):
        phrase_table([[]], CLOSE)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoint)


@pytest.mark.parametrize("task", ["detection", "pointing"])
def test_constrained_phrases_are_categories_and_the_answer_stays_grammatical(tokenizer: Tokenizer, task: str) -> None:
    ids = tokenizer.ids
    categories = ["cup", "door handle", "cupboard", "person"]
    encoded = [tokenizer.encode_text(c) for c in categories]
    table = phrase_table(encoded, ids.object_ref_end)
    seen_groups, seen_categories = 0, set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        embed = structural_table(rng, ids, 2048, long_phrases=False)
        backend = RecordingBackend(tokenizer, embed, lambda: rng.standard_normal(HIDDEN).astype(np.float32))
        loop = DecodeLoop(backend, backend.make_head(Sampling()), ids, mode="structured", limits=UNGUARDED)
        prompt, image_embeds = request(ids, rng)
        grammar = make_grammar(task, ids, (320, 240), decode=tokenizer.decode)
        gen = loop.run(prompt, image_embeds, np.tile(np.arange(len(prompt)), (3, 1)), -9, grammar, table)
        text = tokenizer.decode(gen.token_ids)
        groups = groups_of(text, task)
        assert gen.stop_reason == "eos"
        for phrase_ids in phrases(gen.token_ids, ids):
            assert phrase_ids in encoded, f"seed {seed}: phrase {tokenizer.decode(phrase_ids)!r} is no category"
        assert {d.phrase for d in gen.detections} <= set(categories)
        seen_groups += len(groups)
        seen_categories |= {phrase for phrase, _ in groups}
        # a phrase costs one choice per branch; the rest of a category is appended in one step
        assert gen.steps["free"] == 0
    assert seen_groups > 5 and len(seen_categories) >= 3, (seen_groups, seen_categories)
