"""Typed results -> the official dictionary, JSON, COCO results and drawings."""

import json
import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from rexedge.runtime import parse_prediction
from rexedge.runtime.results.coco import CocoExportError, to_coco_results
from rexedge.runtime.results.draw import PALETTE, draw_detections, phrase_colours
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.decode.grammar import make_grammar
from rexedge.runtime.results.detections import (
    Detection, KeypointInstance, ResultFormatError, bins_to_pixels, detections_from_json, detections_to_json,
    official_entries, to_official)


def det(kind, phrase, bins, size=(640, 427), score=None):
    return Detection(kind, phrase, tuple(bins), bins_to_pixels(bins, *size), score)


# ---------------------------------------------------------------- the official dictionary

def test_detection_entries_have_the_official_shapes():
    assert det("box", "a", (0, 999, 999, 0), (10, 20)).to_official() == {
        "type": "box", "coords": [0.0, 20.0, 10.0, 0.0]}
    assert det("point", "a", (999, 0), (10, 20)).to_official() == {"type": "point", "coords": [10.0, 0.0]}
    assert det("polygon", "a", (0, 0, 999, 0, 999, 999), (10, 20)).to_official() == {
        "type": "polygon", "coords": [[0.0, 0.0], [10.0, 0.0], [10.0, 20.0]]}


def test_keypoint_instance_entry():
    instance = KeypointInstance("person", "person1", det("box", "person", (0, 0, 999, 999), (10, 20)),
                                {"nose": (1.5, 2.5), "left eye": None})
    assert instance.to_official() == {"type": "keypoint", "bbox": [0.0, 0.0, 10.0, 20.0],
                                      "keypoints": {"nose": [1.5, 2.5], "left eye": "unvisible"},
                                      "instance_id": "person1"}


def test_to_official_groups_by_stripped_phrase_and_lists_absent_phrases():
    a1, b, a2 = det("box", " a ", (1, 2, 3, 4)), det("point", "b", (5, 6)), det("box", "a", (7, 8, 9, 10))
    official = to_official([a1, b, a2], absent=["c", "b"])
    assert official == {"a": [a1.to_official(), a2.to_official()], "b": [b.to_official()], "c": []}
    assert list(official) == ["a", "b", "c"]


# Stand-in token ids in the tiny vocabulary's layout (COMMON.md): coordinates 1000..1999,
# specials from 2000; "," "  " and a two-id "None" are ordinary ids below 1000.
IDS = SimpleNamespace(coord_start=1000, num_coords=1000, endoftext=2000, im_start=2001, im_end=2002,
                      object_ref_start=2003, object_ref_end=2004, box_start=2005, box_end=2006,
                      vision_start=2009, vision_end=2010, image_pad=2012, comma=11, space=220, none=(64, 65))
TEXT_OF_ID = {11: ",", 220: " ", 64: "No", 65: "ne", 2002: "<|im_end|>", 2003: "<|object_ref_start|>",
              2004: "<|object_ref_end|>", 2005: "<|box_start|>", 2006: "<|box_end|>",
              **{1000 + b: f"<{b}>" for b in range(1000)}}
PHRASE_CHARS = "abcxyz-.é1"
TEXT_OF_ID.update({300 + i: c for i, c in enumerate(PHRASE_CHARS)})
ID_OF_CHAR = {c: 300 + i for i, c in enumerate(PHRASE_CHARS)} | {",": 11, " ": 220}

COORDS_OF_TASK = {"detection": st.just(4), "ocr_box": st.just(4), "pointing": st.just(2),
                  "ocr_polygon": st.integers(3, 6).map(lambda n: 2 * n)}


@st.composite
def responses(draw, task):
    """Token ids of a well-formed response of ``task`` (phrases may hold commas and spaces)."""
    ids = []
    for g in range(draw(st.integers(0, 5))):
        if g:
            ids += [IDS.comma, IDS.space]
        phrase = draw(st.text(alphabet=PHRASE_CHARS + ", ", min_size=1, max_size=10))
        ids += [IDS.object_ref_start, *(ID_OF_CHAR[c] for c in phrase), IDS.object_ref_end, IDS.box_start]
        if draw(st.booleans()):
            ids += list(IDS.none)
        else:
            for k in range(draw(st.integers(1, 4))):
                if k:
                    ids.append(IDS.comma)
                n = draw(COORDS_OF_TASK[task])
                ids += [1000 + b for b in draw(st.lists(st.integers(0, 999), min_size=n, max_size=n))]
        ids.append(IDS.box_end)
    return ids + [IDS.im_end]


def decode(ids):
    return "".join(TEXT_OF_ID[i] for i in ids)


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("task", list(COORDS_OF_TASK))
@settings(max_examples=40, deadline=None)
@given(data=st.data(), size=st.tuples(st.integers(1, 4000), st.integers(1, 4000)))
def test_grammar_detections_convert_to_what_parse_prediction_reads_from_the_text(impl, task, data, size):
    ids = data.draw(responses(task))
    grammar = make_grammar(task, IDS, size, impl, decode=decode)
    for token in ids:
        grammar.advance(token)
    assert to_official(grammar.detections, grammar.absent) == parse_prediction(decode(ids), *size, task)


# ---------------------------------------------------------------- JSON

def test_json_round_trip_of_typed_results():
    results = [det("box", "cup", (1, 2, 3, 4), score=0.75), det("polygon", "Hi, you", (1, 2, 3, 4, 5, 6)),
               KeypointInstance("person", "person1", det("box", "person", (10, 20, 30, 40)),
                                {"nose": (3.0, 4.0), "left eye": None}, 0.5)]
    items = detections_to_json(results)
    assert json.loads(json.dumps(items)) == items
    assert items[0] == {"phrase": "cup", "type": "box", "coords": list(results[0].coords), "bins": [1, 2, 3, 4],
                        "score": 0.75}
    assert items[2]["keypoints"] == {"nose": [3.0, 4.0], "left eye": None}
    assert detections_from_json(json.loads(json.dumps(items))) == results


def test_json_of_an_official_dictionary():
    text = ('<|object_ref_start|>a<|object_ref_end|><|box_start|><0><0><999><999>,<999><0><|box_end|>, '
            '<|object_ref_start|>b<|object_ref_end|><|box_start|>None<|box_end|><|im_end|>')
    items = detections_to_json(parse_prediction(text, 20, 10, "detection"))
    assert items == [{"phrase": "a", "type": "box", "coords": [0.0, 0.0, 20.0, 10.0], "bins": None, "score": None},
                     {"phrase": "a", "type": "point", "coords": [20.0, 0.0], "bins": None, "score": None}]


@pytest.mark.parametrize("bad", [
    "text", 42, [{"type": "box"}], {"a": "not a list"}, {"a": [{"type": "circle", "coords": [1, 2]}]},
    {"a": [{"type": "keypoint", "bbox": [1, 2, 3, 4]}]}, {1: []},
])
def test_results_in_an_unknown_shape_are_a_clear_error(bad):
    with pytest.raises(ResultFormatError, match="results"):
        official_entries(bad)


def test_json_that_rexedge_did_not_write_is_a_clear_error():
    with pytest.raises(ResultFormatError, match="result JSON"):
        detections_from_json([{"phrase": "a", "type": "box", "coords": [1, 2, 3, 4]}])


# ---------------------------------------------------------------- COCO

def check_coco_item(item, extra=()):
    """The COCO results format: ints for ids, [x, y, w, h] floats with w, h >= 0, a float score."""
    assert set(item) == {"image_id", "category_id", "bbox", "score", *extra}
    assert type(item["image_id"]) is int and type(item["category_id"]) is int
    assert len(item["bbox"]) == 4 and all(type(v) is float and math.isfinite(v) for v in item["bbox"])
    assert item["bbox"][2] >= 0 and item["bbox"][3] >= 0
    assert type(item["score"]) is float
    json.dumps(item)


def test_coco_boxes_with_and_without_scores_and_unmatched_phrases_reported():
    results = [det("box", "cup", (100, 200, 300, 600), (999, 1998), 0.8),
               det("box", "cup", (300, 600, 100, 200), (999, 1998)),  # corners swapped by the model
               det("box", "robot-shape light", (0, 0, 10, 10), (999, 1998)),
               det("box", "robot-shape light", (1, 1, 10, 10), (999, 1998)),
               det("box", "dgo", (0, 0, 1, 1), (999, 1998))]
    coco, unmatched = to_coco_results(results, 7, {"cup": 47, "dog": 18, "robot-shope light": 3})
    assert unmatched == {"robot-shape light": 2, "dgo": 1}
    assert len(coco) == 2
    for item in coco:
        check_coco_item(item)
        assert item["image_id"] == 7 and item["category_id"] == 47
        assert item["bbox"] == pytest.approx([100.0, 400.0, 200.0, 800.0], rel=1e-12)
    assert [item["score"] for item in coco] == [0.8, 1.0]


def test_coco_from_the_official_dictionary_equals_from_typed_results():
    text = ('<|object_ref_start|>cup<|object_ref_end|><|box_start|><10><20><110><220>,<500><20><600><200>'
            '<|box_end|>, <|object_ref_start|>dog<|object_ref_end|><|box_start|>None<|box_end|><|im_end|>')
    from_official = to_coco_results(parse_prediction(text, 641, 359, "detection"), 1, {"cup": 1, "dog": 2})
    typed = [det("box", "cup", (10, 20, 110, 220), (641, 359)), det("box", "cup", (500, 20, 600, 200), (641, 359))]
    assert from_official == to_coco_results(typed, 1, {"cup": 1, "dog": 2})
    assert from_official.unmatched == {}


def test_coco_polygon_has_segmentation_and_its_extent_as_bbox():
    poly = det("polygon", "Hello, world", (100, 500, 300, 400, 200, 900), (999, 999), 0.6)
    (item,), unmatched = to_coco_results([poly], 3, {"Hello, world": 1})
    check_coco_item(item, extra=["segmentation"])
    assert item["segmentation"] == [pytest.approx([100, 500, 300, 400, 200, 900], rel=1e-12)]
    assert item["bbox"] == pytest.approx([100, 400, 200, 500], rel=1e-12)
    assert unmatched == {}


def test_coco_keypoints_in_the_requested_order_with_visibility():
    instance = KeypointInstance("person", "person1", det("box", "person", (0, 0, 999, 999), (50, 80)),
                                {"left eye": (10.0, 11.0), "nose": (5.0, 6.0), "right eye": None})
    (item,), _ = to_coco_results([instance], 1, {"person": 1})
    check_coco_item(item, extra=["keypoints"])
    assert item["keypoints"] == [10.0, 11.0, 2, 5.0, 6.0, 2, 0.0, 0.0, 0]
    assert item["bbox"] == [0.0, 0.0, 50.0, 80.0]
    (item,), _ = to_coco_results([instance], 1, {"person": 1}, keypoint_names=["nose", "left eye", "right eye",
                                                                              "left ear"])
    assert item["keypoints"] == [5.0, 6.0, 2, 10.0, 11.0, 2, 0.0, 0.0, 0, 0.0, 0.0, 0]
    with pytest.raises(CocoExportError, match="left eye"):
        to_coco_results([instance], 1, {"person": 1}, keypoint_names=["nose", "right eye"])


def test_coco_refuses_points_and_bad_ids():
    with pytest.raises(CocoExportError, match="point"):
        to_coco_results([det("point", "cup", (1, 2))], 1, {"cup": 1})
    with pytest.raises(CocoExportError, match="image_id"):
        to_coco_results([], "img1", {"cup": 1})
    with pytest.raises(CocoExportError, match="cup"):
        to_coco_results([], 1, {"cup": 1.0})
    assert issubclass(CocoExportError, RexEdgeError)


# ---------------------------------------------------------------- drawing

SIZE = (333, 201)


def test_draw_each_kind_at_its_place_in_its_phrase_colour():
    box = det("box", "cup", (60, 150, 360, 750), SIZE)            # x 20..120, y 30.2..151
    point = det("point", "dot", (600, 500), SIZE)                  # (199.8, 100.6)
    poly = det("polygon", "text", (450, 800, 870, 800, 870, 990, 450, 990), SIZE)
    person = KeypointInstance("person", "person1", det("box", "person", (690, 100, 960, 450), SIZE),
                              {"nose": (280.0, 50.0), "left eye": None})
    blank = Image.new("RGB", SIZE)
    drawn = draw_detections(blank, [box, point, poly, person], line_width=3, point_radius=4, show_labels=False)
    assert drawn.size == SIZE and drawn.mode == "RGB"
    assert blank.getbbox() is None  # the input is not drawn on
    colours = phrase_colours(["cup", "dot", "text", "person"])
    assert len(set(colours.values())) == 4
    assert drawn.getpixel((21, 90)) == colours["cup"]        # left edge of the box
    assert drawn.getpixel((70, 150)) == colours["cup"]       # bottom edge
    assert drawn.getpixel((70, 90)) == (0, 0, 0)             # inside stays untouched
    assert drawn.getpixel((200, 101)) == colours["dot"]
    assert drawn.getpixel((220, 161)) == colours["text"]     # top edge of the polygon (y = 160.9)
    assert drawn.getpixel((230, 180)) == (0, 0, 0)
    assert drawn.getpixel((280, 50)) == colours["person"]    # the visible keypoint
    assert drawn.getpixel((231, 40)) == colours["person"]    # the instance box's left edge
    assert drawn.getpixel((5, 190)) == (0, 0, 0)


def test_labels_are_drawn_and_longer_with_a_score():
    def coloured_pixels(score):
        image = draw_detections(Image.new("L", SIZE), [det("box", "cup", (300, 600, 600, 900), SIZE, score)],
                                line_width=1)
        without = draw_detections(Image.new("L", SIZE), [det("box", "cup", (300, 600, 600, 900), SIZE, score)],
                                  line_width=1, show_labels=False)
        assert image.size == SIZE
        return int(np.count_nonzero(np.asarray(image) != np.asarray(without)))

    assert 0 < coloured_pixels(None) < coloured_pixels(0.87)


def test_draw_the_official_dictionary_like_typed_results():
    text = ('<|object_ref_start|>cup<|object_ref_end|><|box_start|><10><20><110><220><|box_end|>, '
            '<|object_ref_start|>pen<|object_ref_end|><|box_start|><500><500><|box_end|><|im_end|>')
    official = parse_prediction(text, *SIZE, "detection")
    typed = [det("box", "cup", (10, 20, 110, 220), SIZE), det("point", "pen", (500, 500), SIZE)]
    a, b = (draw_detections(Image.new("RGB", SIZE), r) for r in (official, typed))
    assert a.tobytes() == b.tobytes() and a.getbbox() is not None


def test_phrase_colours_are_stable_and_distinct():
    phrases = [f"category {i}" for i in range(len(PALETTE))]
    colours = phrase_colours(phrases)
    assert len(set(colours.values())) == len(PALETTE)
    assert phrase_colours(phrases) == colours
    slot = {}
    for i in range(10_000):  # two phrases that hash to the same palette slot
        s = zlib.crc32(f"p{i}".encode()) % len(PALETTE)
        if s in slot:
            first, second = slot[s], f"p{i}"
            break
        slot[s] = f"p{i}"
    assert phrase_colours([second])[second] == phrase_colours([first])[first]
    pair = phrase_colours([first, second])
    assert pair[first] == phrase_colours([first])[first] and pair[second] != pair[first]


def test_draw_rejects_what_is_not_an_image():
    with pytest.raises(RexEdgeError, match="image"):
        draw_detections(b"\x89PNG", [])
