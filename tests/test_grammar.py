"""The output grammar (C core and Python reference) against the documented format.

Responses are rendered here from the grammar in docs/model.md ("Output grammar"), each token
with what the documentation says may come next and what it completes; both cores must
agree with that rendering at every step. Malformed output is checked against the
recovery rules in rexedge.runtime.decode.grammar's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.decode.grammar import (
    CHOICE,
    COORD,
    DONE,
    FORCED,
    FREE,
    MAX_PHRASE_IDS,
    MAX_POLYGON_COORDS,
    GrammarConfigError,
    make_grammar,
)
from rexedge.runtime.request.tokenizer import TokenIds

IMPLS = ("c", "python")

# The tiny vocabulary's layout (COMMON.md); ",", " " and "None" are ordinary ids below 1000.
TINY_IDS = TokenIds(coord_start=1000, num_coords=1000, endoftext=2000, im_start=2001, im_end=2002,
                    object_ref_start=2003, object_ref_end=2004, box_start=2005, box_end=2006,
                    vision_start=2009, vision_end=2010, image_pad=2012, comma=11, space=220, none=(700, 701))
SINGLE_NONE_IDS = TokenIds(**{**TINY_IDS.__dict__, "none": (731,)})

TASK_OF_GEOMETRY = {"box": "detection", "point": "pointing", "polygon": "ocr_polygon"}
BOX_TASKS = ("detection", "visual_prompting", "gui_grounding", "ocr_box")
POINT_TASKS = ("pointing", "gui_pointing")


def decode(ids: list[int]) -> str:
    """A stand-in for the tokenizer's decode: distinct ids give distinct text."""
    return "|".join(f"t{i}" for i in ids)


@dataclass
class Step:
    token: int
    expected_next: tuple
    completes: tuple | None = None   # ("absent", phrase ids) or (kind, phrase ids, bins)


def render(groups: list, kind: str, ids: TokenIds = TINY_IDS) -> list[Step]:
    """Tokens of a well-formed response, each with the documented next() before it.

    groups: (phrase ids, payload) with payload None ("None") or a list of bin tuples.
    """
    open_choice = (CHOICE, (ids.object_ref_start, ids.im_end))
    close_geom = (COORD, (ids.comma, ids.box_end)) if kind == "polygon" else (CHOICE, (ids.comma, ids.box_end))
    steps: list[Step] = []
    for index, (phrase, payload) in enumerate(groups):
        if index == 0:
            steps.append(Step(ids.object_ref_start, open_choice))
        else:
            steps.append(Step(ids.comma, (CHOICE, (ids.comma, ids.im_end))))
            steps.append(Step(ids.space, (FORCED, (ids.space, ids.object_ref_start))))
            steps.append(Step(ids.object_ref_start, (FORCED, (ids.object_ref_start,))))
        phrase_text = (FREE, (ids.object_ref_end,))
        steps.extend(Step(t, phrase_text) for t in phrase)
        steps.append(Step(ids.object_ref_end, phrase_text))
        steps.append(Step(ids.box_start, (FORCED, (ids.box_start,))))
        if payload is None:
            steps.append(Step(ids.none[0], (COORD, (ids.none[0],))))
            steps.extend(Step(ids.none[k], (FORCED, ids.none[k:] + (ids.box_end,))) for k in range(1, len(ids.none)))
            steps.append(Step(ids.box_end, (FORCED, (ids.box_end,)), ("absent", tuple(phrase))))
            continue
        for g, bins in enumerate(payload):
            for k, b in enumerate(bins):
                if g == 0 and k == 0:
                    expected = (COORD, (ids.none[0],))
                elif kind == "polygon" and k >= 6 and k % 2 == 0:
                    expected = (COORD, (ids.comma, ids.box_end))
                else:
                    expected = (COORD, ())
                done = kind != "polygon" and k == len(bins) - 1
                steps.append(Step(ids.coord_start + b, expected, (kind, tuple(phrase), tuple(bins)) if done else None))
            closer = ids.comma if g < len(payload) - 1 else ids.box_end
            steps.append(Step(closer, close_geom, (kind, tuple(phrase), tuple(bins)) if kind == "polygon" else None))
    steps.append(Step(ids.im_end, (CHOICE, (ids.comma, ids.im_end)) if groups else open_choice))
    return steps


def random_groups(rng: np.random.Generator, kind: str) -> list:
    groups = []
    for _ in range(rng.integers(0, 5)):
        # ordinary ids 0..1999: commas, spaces, "None" and coordinate-range ids are all text here
        phrase = [int(t) for t in rng.integers(0, 2000, size=rng.integers(1, 9))]
        if rng.random() < 0.25:
            groups.append((phrase, None))
            continue
        sizes = {"box": [4], "point": [2], "polygon": [6, 8, 10, 12]}[kind]
        payload = [tuple(int(b) for b in rng.integers(0, 1000, size=rng.choice(sizes))) for _ in range(rng.integers(1, 5))]
        groups.append((phrase, payload))
    return groups


def pixels(bins: tuple[int, ...], size: tuple[int, int]) -> list[float]:
    width, height = size
    return [b * width / 999 if i % 2 == 0 else b * height / 999 for i, b in enumerate(bins)]


def check_detection(detection, completes: tuple, size: tuple[int, int]) -> None:
    kind, phrase, bins = completes
    assert detection.kind == kind
    assert detection.phrase == decode(list(phrase))
    assert detection.bins == bins
    assert list(detection.coords) == pytest.approx(pixels(bins, size), rel=1e-12)
    assert detection.score is None


def run_steps(grammar, steps: list[Step], size: tuple[int, int]) -> None:
    """Feed a rendered response, checking next() and what each token completes."""
    tokens = [s.token for s in steps]
    for i, step in enumerate(steps):
        kind, allowed = grammar.next()
        assert (kind, allowed) == step.expected_next, f"step {i} (token {step.token})"
        if kind == FORCED:  # jump-forward: the forced ids are exactly what the response holds next
            assert tokens[i:i + len(allowed)] == list(allowed)
        completed = grammar.advance(step.token)
        if step.completes is None or step.completes[0] == "absent":
            assert completed == ()
        else:
            assert len(completed) == 1
            check_detection(completed[0], step.completes, size)
    assert grammar.next() == (DONE, ())
    expected = [s.completes for s in steps if s.completes and s.completes[0] != "absent"]
    assert len(grammar.detections) == len(expected)
    for detection, completes in zip(grammar.detections, expected):
        check_detection(detection, completes, size)
    assert grammar.absent == [decode(list(s.completes[1])) for s in steps if s.completes and s.completes[0] == "absent"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["box", "point", "polygon"])
@pytest.mark.parametrize("seed", range(8))
def test_random_well_formed_responses(impl: str, kind: str, seed: int) -> None:
    rng = np.random.default_rng([seed, len(kind)])
    size = (int(rng.integers(17, 3001)), int(rng.integers(17, 3001)))
    grammar = make_grammar(TASK_OF_GEOMETRY[kind], TINY_IDS, size, impl, decode=decode)
    run_steps(grammar, render(random_groups(rng, kind), kind), size)


@pytest.mark.parametrize("impl", IMPLS)
def test_documented_example(impl: str) -> None:
    """docs/model.md's example, with the pixel coordinates worked out by hand for a 999 x 1998 image."""
    ids = TINY_IDS
    c = ids.coord_start
    cup, dog = [5, 6], [7]
    tokens = [ids.object_ref_start, *cup, ids.object_ref_end, ids.box_start, c + 10, c + 20, c + 110, c + 220,
              ids.comma, c + 500, c + 20, c + 600, c + 200, ids.box_end, ids.comma, ids.space,
              ids.object_ref_start, *dog, ids.object_ref_end, ids.box_start, *ids.none, ids.box_end, ids.im_end]
    grammar = make_grammar("detection", ids, (999, 1998), impl, decode=decode)
    for t in tokens:
        grammar.advance(t)
    assert [(d.kind, d.phrase, d.bins) for d in grammar.detections] == [
        ("box", "t5|t6", (10, 20, 110, 220)), ("box", "t5|t6", (500, 20, 600, 200))]
    assert grammar.detections[0].coords == pytest.approx((10.0, 40.0, 110.0, 440.0))
    assert grammar.detections[1].coords == pytest.approx((500.0, 40.0, 600.0, 400.0))
    assert grammar.absent == ["t7"]
    assert grammar.next() == (DONE, ())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("task", BOX_TASKS + POINT_TASKS + ("ocr_polygon",))
def test_every_task_geometry(impl: str, task: str) -> None:
    kind = "box" if task in BOX_TASKS else "point" if task in POINT_TASKS else "polygon"
    size = (641, 479)
    bins = {"box": (3, 4, 5, 6), "point": (998, 1), "polygon": (0, 0, 999, 0, 999, 999, 0, 999)}[kind]
    grammar = make_grammar(task, TINY_IDS, size, impl, decode=decode)
    run_steps(grammar, render([([40, 41], [bins, bins])], kind), size)


@pytest.mark.parametrize("impl", IMPLS)
def test_polygons_of_6_8_10_coords(impl: str) -> None:
    payload = [tuple(range(10, 16)), tuple(range(20, 28)), tuple(range(30, 40))]
    grammar = make_grammar("ocr_polygon", TINY_IDS, (320, 200), impl, decode=decode)
    run_steps(grammar, render([([9], payload), ([8], payload[::-1])], "polygon"), (320, 200))
    assert [len(d.bins) for d in grammar.detections] == [6, 8, 10, 10, 8, 6]


@pytest.mark.parametrize("impl", IMPLS)
def test_ocr_phrase_with_commas_and_spaces(impl: str) -> None:
    ids = TINY_IDS
    text = [50, ids.comma, ids.space, 51, ids.comma, ids.comma, *ids.none, ids.coord_start + 3]
    grammar = make_grammar("ocr_box", ids, (100, 100), impl, decode=decode)
    run_steps(grammar, render([(text, [(1, 2, 3, 4)]), ([ids.comma], None)], "box"), (100, 100))
    assert grammar.detections[0].phrase == decode(text)
    assert grammar.absent == [decode([ids.comma])]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ids", [TINY_IDS, SINGLE_NONE_IDS], ids=["two-id None", "one-id None"])
def test_none_payloads(impl: str, ids: TokenIds) -> None:
    grammar = make_grammar("pointing", ids, (64, 48), impl, decode=decode)
    run_steps(grammar, render([([1], None), ([2], [(5, 6)]), ([3], None)], "point", ids), (64, 48))
    assert grammar.absent == ["t1", "t3"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("end", ["im_end", "endoftext"])
def test_empty_response(impl: str, end: str) -> None:
    grammar = make_grammar("detection", TINY_IDS, (10, 10), impl, decode=decode)
    assert grammar.next() == (CHOICE, (TINY_IDS.object_ref_start, TINY_IDS.im_end))
    assert grammar.advance(getattr(TINY_IDS, end)) == ()
    assert grammar.next() == (DONE, ())
    assert grammar.detections == [] and grammar.absent == []


@pytest.mark.parametrize("impl", IMPLS)
def test_keypoint_answer_is_free_text(impl: str) -> None:
    ids = TINY_IDS
    rng = np.random.default_rng(3)
    # the JSON text may hold anything, coordinate tokens and grammar specials included
    text = [int(t) for t in rng.integers(0, 2000, size=50)] + [ids.object_ref_start, ids.box_start, ids.box_end, -5]
    grammar = make_grammar("keypoint", ids, (100, 100), impl, decode=decode)
    for t in text:
        assert grammar.next() == (FREE, ())
        assert grammar.advance(t) == ()
    grammar.advance(ids.im_end)
    assert grammar.next() == (DONE, ())
    assert grammar.detections == [] and grammar.absent == []


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["box", "point", "polygon"])
def test_truncated_output_keeps_what_completed(impl: str, kind: str) -> None:
    rng = np.random.default_rng(11)
    steps = render(random_groups(rng, kind) + [([3, 4], [tuple(range(8))[: {"box": 4, "point": 2, "polygon": 8}[kind]]])], kind)
    grammar = make_grammar(TASK_OF_GEOMETRY[kind], TINY_IDS, (50, 70), impl, decode=decode)
    for cut in range(len(steps) + 1):
        grammar.reset()
        for step in steps[:cut]:
            grammar.advance(step.token)
        done = [s.completes for s in steps[:cut] if s.completes]
        assert [(d.kind, d.bins) for d in grammar.detections] == [(c[0], c[2]) for c in done if c[0] != "absent"]
        assert grammar.absent == [decode(list(c[1])) for c in done if c[0] == "absent"]


def feed(grammar, tokens: list[int]) -> list:
    completed = []
    for t in tokens:
        completed.extend(grammar.advance(t))
    return completed


def group(phrase: list[int], *payload_tokens: int, ids: TokenIds = TINY_IDS) -> list[int]:
    return [ids.object_ref_start, *phrase, ids.object_ref_end, ids.box_start, *payload_tokens]


SKIPPING = (CHOICE, (TINY_IDS.object_ref_start, TINY_IDS.im_end))


@pytest.mark.parametrize("impl", IMPLS)
def test_fifth_coordinate_drops_the_rest_of_the_group(impl: str) -> None:
    ids, c = TINY_IDS, TINY_IDS.coord_start
    grammar = make_grammar("detection", ids, (999, 999), impl, decode=decode)
    feed(grammar, group([1], c + 1, c + 2, c + 3, c + 4, c + 5))
    assert grammar.next() == SKIPPING
    feed(grammar, [ids.comma, c + 6, c + 7, c + 8, c + 9, ids.box_end, ids.comma, ids.space])
    assert [d.bins for d in grammar.detections] == [(1, 2, 3, 4)]
    # the next group parses normally
    feed(grammar, group([2], c + 10, c + 11, c + 12, c + 13, ids.box_end, ids.im_end))
    assert [(d.phrase, d.bins) for d in grammar.detections] == [("t1", (1, 2, 3, 4)), ("t2", (10, 11, 12, 13))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("intruder", ["text", "im_start", "vision_start", "box_start", "object_ref_end", "space",
                                      "image_pad"])
def test_misplaced_token_in_a_payload(impl: str, intruder: str) -> None:
    ids, c = TINY_IDS, TINY_IDS.coord_start
    bad = 77 if intruder == "text" else getattr(ids, intruder)
    grammar = make_grammar("detection", ids, (10, 10), impl, decode=decode)
    feed(grammar, group([1], c + 1, c + 2, bad, c + 3, c + 4, ids.box_end))
    assert grammar.next() == SKIPPING
    assert grammar.detections == []
    feed(grammar, group([2], *ids.none, ids.box_end, ids.im_end))
    assert grammar.absent == ["t2"]


@pytest.mark.parametrize("impl", IMPLS)
def test_structural_mistakes(impl: str) -> None:
    ids, c = TINY_IDS, TINY_IDS.coord_start
    cases = [
        [ids.object_ref_start, 1, ids.object_ref_end, ids.box_start, ids.box_end],  # empty payload
        [ids.object_ref_start, 1, ids.object_ref_end, c + 1],                        # <|box_start|> missing
        [ids.object_ref_start, 1, ids.object_ref_end, ids.box_start, ids.none[0], c + 1],  # "None" cut by a coord
        [ids.object_ref_start, 1, ids.object_ref_end, ids.box_start, *ids.none, ids.comma],  # "None" not closed
        [ids.object_ref_start, 1, ids.object_ref_end, ids.box_start, c, c, c, c, ids.box_end, ids.space],  # no ","
        [ids.object_ref_start, 1, ids.object_ref_end, ids.box_start, c, c, c, c, ids.box_end, ids.comma, ids.comma],
        [ids.object_ref_start, 1, ids.object_ref_end, ids.box_start, c, c, c, c, ids.comma, ids.none[0]],
        [55],                                                                        # text before any group
        [ids.box_start],
    ]
    for tokens in cases:
        grammar = make_grammar("detection", ids, (10, 10), impl, decode=decode)
        feed(grammar, tokens)
        assert grammar.next() == SKIPPING, tokens
        feed(grammar, [c + 1, ids.box_end, ids.comma, ids.space, 9, ids.object_ref_end])  # all skipped
        assert grammar.next() == SKIPPING, tokens


@pytest.mark.parametrize("impl", IMPLS)
def test_new_group_resynchronises_anywhere(impl: str) -> None:
    ids, c = TINY_IDS, TINY_IDS.coord_start
    grammar = make_grammar("pointing", ids, (10, 10), impl, decode=decode)
    # a group cut mid-point by a new group, then a phrase restarted by another <|object_ref_start|>
    feed(grammar, group([1], c + 1) + [ids.object_ref_start, 2, 3] + group([4], c + 5, c + 6, ids.box_end))
    # a missing ", " before the next group is forgiven the same way
    feed(grammar, group([7], c + 8, c + 9, ids.box_end, ids.im_end))
    assert [(d.phrase, d.bins) for d in grammar.detections] == [("t4", (5, 6)), ("t7", (8, 9))]


@pytest.mark.parametrize("impl", IMPLS)
def test_end_mid_geometry_and_after_done(impl: str) -> None:
    ids, c = TINY_IDS, TINY_IDS.coord_start
    grammar = make_grammar("ocr_polygon", ids, (10, 10), impl, decode=decode)
    feed(grammar, group([1], *(c + b for b in range(8)), ids.endoftext))   # closable but never closed
    assert grammar.next() == (DONE, ()) and grammar.detections == []
    feed(grammar, group([1], *(c + b for b in range(6)), ids.box_end, ids.im_end))
    assert grammar.next() == (DONE, ()) and grammar.detections == []


@pytest.mark.parametrize("impl", IMPLS)
def test_specials_inside_a_phrase_are_text(impl: str) -> None:
    ids, c = TINY_IDS, TINY_IDS.coord_start
    phrase = [ids.box_start, ids.box_end, ids.im_start, ids.vision_start, c + 5, 2047, 2048 + 5, 10**6]
    grammar = make_grammar("detection", ids, (10, 10), impl, decode=decode)
    feed(grammar, group(phrase, c, c, c, c))
    assert grammar.detections[0].phrase == decode(phrase)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [-1, -(2**70), 2**31, 2**64, 2**100])
def test_ids_that_are_no_token(impl: str, bad: int) -> None:
    ids, c = TINY_IDS, TINY_IDS.coord_start
    for prefix in ([], [ids.object_ref_start, 1], group([1]), group([1], c, c), group([1], c, c, c, c, ids.box_end)):
        grammar = make_grammar("detection", ids, (10, 10), impl, decode=decode)
        feed(grammar, prefix)
        before = grammar.detections
        assert grammar.advance(bad) == ()
        assert grammar.next() == SKIPPING
        feed(grammar, [ids.object_ref_end, ids.box_start, c, c, c, c])
        assert grammar.detections == before


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [1.0, "5", None, 3 + 0j])
def test_non_integer_ids_are_refused(impl: str, bad: object) -> None:
    grammar = make_grammar("detection", TINY_IDS, (10, 10), impl, decode=decode)
    with pytest.raises(TypeError):
        grammar.advance(bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_numpy_integer_ids(impl: str) -> None:
    ids = TINY_IDS
    tokens = np.array(group([1], *(ids.coord_start + np.arange(4)), ids.box_end, ids.im_end), dtype=np.int64)
    grammar = make_grammar("detection", ids, (10, 10), impl, decode=decode)
    for t in tokens:
        grammar.advance(t)
    assert [d.bins for d in grammar.detections] == [(0, 1, 2, 3)]


@pytest.mark.parametrize("impl", IMPLS)
def test_runaway_phrase_is_truncated_and_closed(impl: str) -> None:
    ids, c = TINY_IDS, TINY_IDS.coord_start
    rng = np.random.default_rng(5)
    phrase = [int(t) for t in rng.integers(0, 2000, size=MAX_PHRASE_IDS + 37)]
    grammar = make_grammar("detection", ids, (10, 10), impl, decode=decode)
    grammar.advance(ids.object_ref_start)
    for i, t in enumerate(phrase):
        assert grammar.next() == ((FREE, (ids.object_ref_end,)) if i < MAX_PHRASE_IDS else (FORCED, (ids.object_ref_end,)))
        grammar.advance(t)
    feed(grammar, [ids.object_ref_end, ids.box_start, c, c + 1, c + 2, c + 3])
    assert grammar.detections[0].phrase == decode(phrase[:MAX_PHRASE_IDS])


@pytest.mark.parametrize("impl", IMPLS)
def test_polygon_length_cap(impl: str) -> None:
    ids, c = TINY_IDS, TINY_IDS.coord_start
    grammar = make_grammar("ocr_polygon", ids, (10, 10), impl, decode=decode)
    feed(grammar, group([1]))
    for i in range(MAX_POLYGON_COORDS):
        grammar.advance(c + i % 1000)
    assert grammar.next() == (CHOICE, (ids.comma, ids.box_end))
    (polygon,) = grammar.advance(ids.comma)
    assert polygon.bins == tuple(i % 1000 for i in range(MAX_POLYGON_COORDS))
    for i in range(MAX_POLYGON_COORDS):
        grammar.advance(c + 1)
    grammar.advance(c + 1)  # one too many
    assert grammar.next() == SKIPPING
    assert len(grammar.detections) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_next_returns_cached_tuples(impl: str) -> None:
    ids, c = TINY_IDS, TINY_IDS.coord_start
    grammar = make_grammar("detection", ids, (10, 10), impl, decode=decode)
    seen = {}
    for t in group([1], c, c, c, c, ids.comma, c, c, c, c, ids.box_end) + group([2], c, c, c, c, ids.box_end):
        result = grammar.next()
        assert seen.setdefault(result, result) is result  # the same object every time this state recurs
        grammar.advance(t)


@pytest.mark.parametrize("impl", IMPLS)
def test_phrase_decoded_once_per_group_and_reset(impl: str) -> None:
    ids, c = TINY_IDS, TINY_IDS.coord_start
    calls = []

    def counting_decode(phrase_ids: list[int]) -> str:
        calls.append(list(phrase_ids))
        return decode(phrase_ids)

    tokens = group([1, 2], *([c, c, c, c, ids.comma] * 5), c, c, c, c, ids.box_end, ids.im_end)
    grammar = make_grammar("detection", ids, (10, 10), impl, decode=counting_decode)
    feed(grammar, tokens)
    assert calls == [[1, 2]] and len(grammar.detections) == 6
    first = [(d.phrase, d.bins, d.coords) for d in grammar.detections]
    grammar.detections.clear()  # a copy: the grammar's own list is untouched
    assert len(grammar.detections) == 6
    grammar.reset()
    assert grammar.detections == [] and grammar.absent == []
    assert grammar.next() == (CHOICE, (ids.object_ref_start, ids.im_end))
    feed(grammar, tokens)
    assert [(d.phrase, d.bins, d.coords) for d in grammar.detections] == first


def test_errors_name_the_bad_input() -> None:
    with pytest.raises(GrammarConfigError, match="unknown task 'detect'.*detection"):
        make_grammar("detect", TINY_IDS, (10, 10), decode=decode)
    with pytest.raises(GrammarConfigError, match="impl 'rust'"):
        make_grammar("detection", TINY_IDS, (10, 10), "rust", decode=decode)
    for size in [(0, 10), (10, -1), (10.5, 10), (10,), "10x10", None]:
        with pytest.raises(GrammarConfigError, match="image_size"):
            make_grammar("detection", TINY_IDS, size, decode=decode)
    bad_ids = {
        "comma=1500 lies among the coordinate": {"comma": 1500},
        "box_end and box_start are the same": {"box_end": TINY_IDS.box_start},
        "1000 coordinate tokens": {"num_coords": 999},
        '"None" must be 1 to 16': {"none": ()},
        "none\\[0\\] and space": {"none": (TINY_IDS.space,)},
        "im_end=-3 is not a token": {"im_end": -3},
    }
    for message, change in bad_ids.items():
        ids = TokenIds(**{**TINY_IDS.__dict__, **change})
        with pytest.raises(GrammarConfigError, match=message):
            make_grammar("detection", ids, (10, 10), decode=decode)
    assert issubclass(GrammarConfigError, RexEdgeError)


def test_both_cores_refuse_the_same_arguments() -> None:
    from rexedge.runtime.decode._grammar import GrammarCore
    from rexedge.runtime.decode.grammar import NextKind, ReferenceGrammarCore

    good = dict(geometry=0, coord_start=1000, num_coords=1000, endoftext=2000, im_end=2002, object_ref_start=2003,
                object_ref_end=2004, box_start=2005, box_end=2006, comma=11, space=220, none=(700,),
                max_phrase_ids=4, max_polygon_coords=8, kinds=tuple(NextKind))
    GrammarCore(**good), ReferenceGrammarCore(**good)
    for change in [{"geometry": 4}, {"geometry": -1}, {"num_coords": 0}, {"coord_start": 2**31 - 10},
                   {"comma": -1}, {"space": 2**31}, {"none": ()}, {"none": tuple(range(17))}, {"none": (-1,)},
                   {"max_phrase_ids": 0}, {"max_polygon_coords": 7}, {"max_polygon_coords": 4}, {"kinds": (1, 2)}]:
        for core in (GrammarCore, ReferenceGrammarCore):
            with pytest.raises(ValueError):
                core(**{**good, **change})
