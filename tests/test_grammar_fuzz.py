"""Random token streams: the C core and the Python reference must behave identically.

Streams are biased toward the grammar's own ids so that they reach deep states, and the
cores are also built with tiny phrase / polygon caps so the caps' edges are hit often.
Walks that always obey next() must spell a response of the documented grammar.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rexedge.runtime.decode._grammar import GrammarCore
from rexedge.runtime.decode.grammar import (
    CHOICE,
    COORD,
    DONE,
    FORCED,
    FREE,
    MAX_PHRASE_IDS,
    MAX_POLYGON_COORDS,
    Geometry,
    NextKind,
    ReferenceGrammarCore,
    make_grammar,
)
from rexedge.runtime.request.tokenizer import TokenIds

TINY_IDS = TokenIds(coord_start=1000, num_coords=1000, endoftext=2000, im_start=2001, im_end=2002,
                    object_ref_start=2003, object_ref_end=2004, box_start=2005, box_end=2006,
                    vision_start=2009, vision_end=2010, image_pad=2012, comma=11, space=220, none=(700, 701))
STRUCTURAL = [TINY_IDS.object_ref_start, TINY_IDS.object_ref_end, TINY_IDS.box_start, TINY_IDS.box_end,
              TINY_IDS.comma, TINY_IDS.space, *TINY_IDS.none, TINY_IDS.im_start, TINY_IDS.vision_start]
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

token_ids = st.one_of(
    st.sampled_from(STRUCTURAL),
    st.sampled_from(STRUCTURAL),
    st.integers(TINY_IDS.coord_start, TINY_IDS.coord_start + TINY_IDS.num_coords - 1),
    st.integers(TINY_IDS.coord_start, TINY_IDS.coord_start + TINY_IDS.num_coords - 1),
    st.integers(0, 2047),
    st.sampled_from([TINY_IDS.im_end, TINY_IDS.endoftext, -1, 2**31 - 1, 2**31, -(2**63), 2**200, 2**64 + 1003]),
)
cores = st.tuples(st.sampled_from(list(Geometry)), st.sampled_from([(1, 6), (3, 8), (MAX_PHRASE_IDS, MAX_POLYGON_COORDS)]),
                  st.sampled_from([(700, 701), (731,), (700, 701, 702)]))


def build_cores(geometry: Geometry, caps: tuple[int, int], none: tuple[int, ...]) -> tuple:
    ids = TINY_IDS
    args = (int(geometry), ids.coord_start, ids.num_coords, ids.endoftext, ids.im_end, ids.object_ref_start,
            ids.object_ref_end, ids.box_start, ids.box_end, ids.comma, ids.space, none, *caps, tuple(NextKind))
    return GrammarCore(*args), ReferenceGrammarCore(*args)


def assert_same(c_core, py_core, tokens: list[int]) -> None:
    for i, t in enumerate(tokens):
        assert c_core.next() == py_core.next(), f"next() before token {i}"
        assert c_core.coord_range() == py_core.coord_range(), f"coord_range() before token {i}"
        assert c_core.advance(t) == py_core.advance(t), f"event of token {i} ({t})"
    assert c_core.next() == py_core.next()
    assert c_core.coord_range() == py_core.coord_range()


@FUZZ
@given(core=cores, tokens=st.lists(token_ids, max_size=120))
def test_random_streams_agree(core: tuple, tokens: list[int]) -> None:
    c_core, py_core = build_cores(*core)
    assert_same(c_core, py_core, tokens)
    c_core.reset(), py_core.reset()
    assert_same(c_core, py_core, tokens[::-1])


@FUZZ
@given(core=cores, data=st.data())
def test_walks_along_next_agree_and_spell_the_grammar(core: tuple, data: st.DataObject) -> None:
    """Mostly follow next() (as structured decoding does), now and then inject any id."""
    geometry, caps, none = core
    c_core, py_core = build_cores(geometry, caps, none)
    tokens: list[int] = []
    obeyed = True
    while len(tokens) < 300:
        kind, allowed = c_core.next()
        assert (kind, allowed) == py_core.next()
        assert c_core.coord_range() == py_core.coord_range()
        if kind == DONE:
            break
        if data.draw(st.integers(0, 39)) == 0:
            chosen = [data.draw(token_ids)]
            obeyed = False
        elif kind == FORCED:
            chosen = list(allowed)
        elif kind == CHOICE:  # mostly the first: another group, another geometry
            chosen = [allowed[0] if data.draw(st.integers(0, 3)) else allowed[-1]]
        elif kind == COORD:
            # half the time inside coord_range() (structured decoding), else anywhere (exact mode)
            start, stop = c_core.coord_range() if data.draw(st.booleans()) else (TINY_IDS.coord_start, TINY_IDS.coord_start + 1000)
            coord = st.integers(start, stop - 1)
            chosen = [data.draw(st.one_of(coord, st.sampled_from(allowed)) if allowed else coord)]
        else:
            assert kind == FREE
            ends = [TINY_IDS.im_end] if geometry == Geometry.TEXT else [TINY_IDS.object_ref_end]
            chosen = [data.draw(st.sampled_from(ends)) if data.draw(st.integers(0, 2)) == 0 else data.draw(st.integers(0, 999))]
        for t in chosen:
            tokens.append(t)
            assert c_core.advance(t) == py_core.advance(t)
    if obeyed and geometry != Geometry.TEXT and c_core.next()[0] == DONE:
        assert re.fullmatch(response_pattern(geometry, len(none)), spell(tokens)), spell(tokens)


@FUZZ
@given(core=cores, data=st.data())
def test_walks_inside_coord_range_give_well_ordered_boxes(core: tuple, data: st.DataObject) -> None:
    """A walk that obeys next() and coord_range() (structured decoding): every box has x1 > x0 and y1 > y0;
    points and polygons may take any coordinate; coord_range() is never empty."""
    geometry, caps, none = core
    c_core, py_core = build_cores(geometry, caps, none)
    for _ in range(300):
        kind, allowed = c_core.next()
        start, stop = c_core.coord_range()
        assert (kind, allowed, (start, stop)) == (*py_core.next(), py_core.coord_range())
        assert TINY_IDS.coord_start <= start < stop <= TINY_IDS.coord_start + 1000
        if geometry != Geometry.BOX:
            assert (start, stop) == (TINY_IDS.coord_start, TINY_IDS.coord_start + 1000)
        if kind == DONE:
            break
        if kind == FORCED:
            chosen = list(allowed)
        elif kind == COORD:
            # the edges of the range often: x0 = <998>, x1 = x0 + 1
            coord = st.one_of(st.integers(start, stop - 1), st.sampled_from([start, stop - 1]))
            chosen = [data.draw(st.one_of(coord, st.sampled_from(allowed)) if allowed else coord)]
        elif kind == CHOICE:
            chosen = [allowed[0] if data.draw(st.integers(0, 3)) else allowed[-1]]
        else:
            chosen = [data.draw(st.sampled_from([TINY_IDS.object_ref_end, TINY_IDS.im_end, 5]))]
        for t in chosen:
            event = c_core.advance(t)
            assert event == py_core.advance(t)
            if event and geometry == Geometry.BOX and event[1]:
                x0, y0, x1, y1 = event[1]
                assert x1 > x0 and y1 > y0, event


def spell(tokens: list[int]) -> str:
    """One letter per id, so that the documented grammar becomes a regular expression."""
    ids = TINY_IDS
    letters = {ids.object_ref_start: "O", ids.object_ref_end: "o", ids.box_start: "B", ids.box_end: "b",
               ids.comma: ",", ids.space: "_", ids.im_end: "$"}
    return "".join(letters.get(t, "c" if ids.coord_start <= t < ids.coord_start + 1000 else "t") for t in tokens)


def response_pattern(geometry: Geometry, none_len: int) -> str:
    geom = {Geometry.BOX: "c{4}", Geometry.POINT: "c{2}", Geometry.POLYGON: "(?:cc){3,}"}[geometry]
    # "None" ids are ordinary text ids (letter t); phrase text may hold "," and " " too
    group = f"O[t,_]*oB(?:t{{{none_len}}}|{geom}(?:,{geom})*)b"
    return rf"(?:{group}(?:,_{group})*)?\$"


@FUZZ
@given(core=cores, tokens=st.lists(token_ids, max_size=80), size=st.tuples(st.integers(1, 5000), st.integers(1, 5000)))
def test_wrappers_agree(core: tuple, tokens: list[int], size: tuple[int, int]) -> None:
    geometry = core[0]
    task = {Geometry.BOX: "ocr_box", Geometry.POINT: "gui_pointing", Geometry.POLYGON: "ocr_polygon",
            Geometry.TEXT: "keypoint"}[geometry]
    ids = TokenIds(**{**TINY_IDS.__dict__, "none": core[2]})
    grammars = [make_grammar(task, ids, size, impl, decode=str) for impl in ("c", "python")]
    for t in tokens:
        assert grammars[0].advance(t) == grammars[1].advance(t)
    assert grammars[0].detections == grammars[1].detections
    assert grammars[0].absent == grammars[1].absent
