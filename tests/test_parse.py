"""parse_prediction against the official Rex-Omni parser's documented behaviour.

Expectations are derived by hand from the output grammar (docs/model.md) and the official
parser's rules (runtime/results/parse.py docstring), or built by the generator that wrote the
text; none is computed by the code under test.
"""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexedge.runtime import parse_prediction
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.results.parse import parse_results
from rexedge.runtime.results.detections import to_official

ORS, ORE, BS, BE, END = "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|im_end|>"
W, H = 640, 427  # an odd height, so x and y scales differ


def group(phrase, payload):
    return f"{ORS}{phrase}{ORE}{BS}{payload}{BE}"


def px(b, size):
    """The documented bin -> pixel rule, written out: bin / 999 of the original side."""
    return b * size / 999


def box(x0, y0, x1, y1, w=W, h=H):
    return {"type": "box", "coords": pytest.approx([px(x0, w), px(y0, h), px(x1, w), px(y1, h)], rel=1e-12)}


def point(x, y, w=W, h=H):
    return {"type": "point", "coords": pytest.approx([px(x, w), px(y, h)], rel=1e-12)}


def polygon(*bins, w=W, h=H):
    pairs = [[px(bins[i], w), px(bins[i + 1], h)] for i in range(0, len(bins), 2)]
    return {"type": "polygon", "coords": [pytest.approx(p, rel=1e-12) for p in pairs]}


# ---------------------------------------------------------------- box / point / polygon tasks

def test_detection_several_boxes_and_none():
    text = group("cup", "<10><20><110><220>,<500><20><600><200>") + ", " + group("dog", "None") + END
    result = parse_prediction(text, W, H, "detection")
    assert result == {"cup": [box(10, 20, 110, 220), box(500, 20, 600, 200)], "dog": []}
    assert list(result) == ["cup", "dog"]


def test_coordinates_are_in_the_original_image_size():
    text = group("x", "<0><0><999><999>") + END
    assert parse_prediction(text, 1440, 810, "detection") == {
        "x": [{"type": "box", "coords": [0.0, 0.0, 1440.0, 810.0]}]}
    assert parse_prediction(text, 3, 7, "detection") == {"x": [{"type": "box", "coords": [0.0, 0.0, 3.0, 7.0]}]}
    half = parse_prediction(group("x", "<333><666>") + END, 999, 1998, "pointing")
    assert half == {"x": [{"type": "point", "coords": [pytest.approx(333.0), pytest.approx(1332.0)]}]}


@pytest.mark.parametrize("task", ["pointing", "gui_pointing"])
def test_points(task):
    text = group("person", "<1><2>,<998><997>") + ", " + group('the "OK" button', "<500><500>") + END
    assert parse_prediction(text, W, H, task) == {
        "person": [point(1, 2), point(998, 997)], 'the "OK" button': [point(500, 500)]}


@pytest.mark.parametrize("task", ["visual_prompting", "gui_grounding", "ocr_box"])
def test_box_tasks(task):
    text = group("object", "<3><4><5><6>") + END
    assert parse_prediction(text, W, H, task) == {"object": [box(3, 4, 5, 6)]}


def test_ocr_polygon_sizes_and_text_with_commas():
    text = (group("Hello, world", "<1><2><3><4><5><6>,<7><8><9><10><11><12><13><14>") + ", "
            + group("1,000,000", "<0><0><1><1><2><2><3><3><4><4>") + END)
    assert parse_prediction(text, W, H, "ocr_polygon") == {
        "Hello, world": [polygon(1, 2, 3, 4, 5, 6), polygon(7, 8, 9, 10, 11, 12, 13, 14)],
        "1,000,000": [polygon(0, 0, 1, 1, 2, 2, 3, 3, 4, 4)]}


def test_ocr_box_text_with_commas_and_spaces():
    text = group("Dear Dad, ", "<1><2><3><4>") + ", " + group(", , ", "<5><6><7><8>") + END
    # phrases are stripped of surrounding whitespace; inner commas stay
    assert parse_prediction(text, W, H, "ocr_box") == {"Dear Dad,": [box(1, 2, 3, 4)], ", ,": [box(5, 6, 7, 8)]}


def test_the_count_of_coordinates_decides_the_kind_not_the_task():
    payload = "<1><2>,<1><2><3><4>,<1><2><3><4><5><6>,<1>,<1><2><3>,<1><2><3><4><5>,<1><2><3><4><5><6><7>"
    assert parse_prediction(group("a", payload) + END, W, H, "detection") == {
        "a": [point(1, 2), box(1, 2, 3, 4), polygon(1, 2, 3, 4, 5, 6)]}


def test_repeated_phrase_extends_and_keeps_first_position():
    text = group("a", "<1><1><2><2>") + ", " + group("b", "None") + ", " + group("a", "<3><3><4><4>") + END
    result = parse_prediction(text, W, H, "detection")
    assert result == {"a": [box(1, 1, 2, 2), box(3, 3, 4, 4)], "b": []}
    assert list(result) == ["a", "b"]


def test_text_after_im_end_and_between_groups_is_ignored():
    text = ("noise " + group("a", "<1><1><2><2>") + " and more noise " + group("b", "<5><5>") + END
            + group("late", "<9><9><9><9>"))
    assert parse_prediction(text, W, H, "detection") == {"a": [box(1, 1, 2, 2)], "b": [point(5, 5)]}


def test_whitespace_between_phrase_end_and_box_start_is_allowed():
    text = f"{ORS} cat {ORE} \n {BS}<1><1><2><2>{BE}{END}"
    assert parse_prediction(text, W, H, "detection") == {"cat": [box(1, 1, 2, 2)]}


@pytest.mark.parametrize("text, expected", [
    ("", {}),
    (END, {}),
    ("There are no objects." + END, {}),
    (group("a", "None") + END, {"a": []}),
    # cut inside the payload: the group is closed as if <|box_end|> followed
    (group("a", "<1><2><3><4>")[:-len(BE)], {"a": [box(1, 2, 3, 4)]}),
    # a box cut after two coordinates is a point, after three it is nothing
    (group("a", "<1><2><3><4>,<5><6>")[:-len(BE)], {"a": [box(1, 2, 3, 4), point(5, 6)]}),
    (group("a", "<1><2><3><4>,<5><6><7>")[:-len(BE)], {"a": [box(1, 2, 3, 4)]}),
    (f"{ORS}a{ORE}{BS}", {"a": []}),
    (f"{ORS}a{ORE}", {}),
    (group("a", "<1><1><2><2>") + ", " + f"{ORS}unfinished phr", {"a": [box(1, 1, 2, 2)]}),
    # a group whose phrase holds "<" or is empty does not match and is skipped
    (group("a<b", "<1><1><2><2>") + ", " + group("c", "<3><3>") + END, {"c": [point(3, 3)]}),
    (group("", "<1><1><2><2>") + END, {}),
    (group("   ", "<1><1><2><2>") + END, {"": [box(1, 1, 2, 2)]}),
    # the payload ends at the first <|box_end|> on the same line
    (f"{ORS}a{ORE}{BS}<1><1>\n<2><2>{BE}{END}", {}),
    # specials or text inside a payload: only the <digits> tokens of each comma piece count
    (group("a", "<1><2>None<3><4>,junk<5>x<6>") + END, {"a": [box(1, 2, 3, 4), point(5, 6)]}),
    # bins are not clamped and leading zeros are plain digits
    (group("a", "<1998><0999>") + END, {"a": [point(1998, 999)]}),
])
def test_malformed_and_truncated(text, expected):
    assert parse_prediction(text, W, H, "detection") == expected


def test_a_truncated_group_swallows_the_next_one_like_the_official_parser():
    # the first group has no <|box_end|>, so its payload runs to the next one
    text = f"{ORS}a{ORE}{BS}<1><2>, {ORS}b{ORE}{BS}<3><4>{BE}{END}"
    assert parse_prediction(text, W, H, "detection") == {"a": [point(1, 2), point(3, 4)]}


def test_a_number_python_cannot_convert_skips_only_that_geometry():
    text = group("a", f"<{'9' * 5000}><1>,<1><2>") + END
    assert parse_prediction(text, W, H, "pointing") == {"a": [point(1, 2)]}


@pytest.mark.parametrize("args, names", [
    ((123, W, H, "detection"), "text"),
    (("", 0, H, "detection"), "width"),
    (("", W, -1, "detection"), "height"),
    (("", 640.0, H, "detection"), "width"),
    (("", True, H, "detection"), "width"),
    (("", W, H, "detect"), "task"),
])
def test_bad_arguments_are_named(args, names):
    with pytest.raises(RexEdgeError, match=names):
        parse_prediction(*args)


# ---------------------------------------------------------------- keypoint task

def kp_text(instances, fence=True):
    body = json.dumps(instances, indent=2)
    return f"```json\n{body}\n```{END}" if fence else body + END


def kp_instance(bbox, **keypoints):
    return {"bbox": bbox, "keypoints": {k.replace("_", " "): v for k, v in keypoints.items()}}


def test_keypoint_instances_with_unvisible_points():
    text = kp_text({
        "person1": kp_instance(" <12> <40> <300> <980> ", nose=" <150> <120> ", left_eye="unvisible",
                               right_eye=" <160> <118> "),
        "person2": kp_instance("<500><40><700><990>", nose="unvisible"),
    })
    assert parse_prediction(text, W, H, "keypoint") == {"person": [
        {"type": "keypoint", "bbox": box(12, 40, 300, 980)["coords"],
         "keypoints": {"nose": point(150, 120)["coords"], "left eye": "unvisible",
                       "right eye": point(160, 118)["coords"]},
         "instance_id": "person1"},
        {"type": "keypoint", "bbox": box(500, 40, 700, 990)["coords"], "keypoints": {"nose": "unvisible"},
         "instance_id": "person2"},
    ]}


def test_malformed_keypoints_become_unvisible():
    text = kp_text({"cat1": kp_instance("<1><2><3><4>", a=None, b=[1, 2], c=" <5> ", d=" <5> <6> <7> ", e="",
                                        f=" <5> <6> ")})
    kps = parse_prediction(text, W, H, "keypoint")["cat"][0]["keypoints"]
    assert kps == {"a": "unvisible", "b": "unvisible", "c": "unvisible", "d": "unvisible", "e": "unvisible",
                   "f": point(5, 6)["coords"]}


def test_instances_without_a_usable_box_or_keypoints_are_skipped():
    text = kp_text({
        "p1": kp_instance("<1><2><3>", nose="<1><1>"),
        "p2": {"bbox": "<1><2><3><4>"},
        "p3": {"keypoints": {}},
        "p4": "bbox keypoints",
        "p5": kp_instance([1, 2, 3, 4]),
        "p6": {"bbox": "<1><2><3><4>", "keypoints": ["nose"]},
        "p7": kp_instance("<1><2><3><4>"),
    })
    assert parse_prediction(text, W, H, "keypoint") == {
        "p": [{"type": "keypoint", "bbox": box(1, 2, 3, 4)["coords"], "keypoints": {}, "instance_id": "p7"}]}


@pytest.mark.parametrize("instance_id, category", [
    ("person1", "person"), ("person", "person"), ("hand_2", "hand_"), ("Dog 3", "Dog"),
    ("2cats", "keypoint_instance"), ("", "keypoint_instance"), ("chat\u00e91", "chat"),
])
def test_category_is_the_leading_ascii_letters_of_the_instance_id(instance_id, category):
    text = kp_text({instance_id: kp_instance("<1><2><3><4>")})
    assert list(parse_prediction(text, W, H, "keypoint")) == [category]


def test_keypoint_json_without_fence_and_first_fence_wins():
    instance = {"person1": kp_instance("<1><2><3><4>", nose="<5><6>")}
    expected = {"person": [{"type": "keypoint", "bbox": box(1, 2, 3, 4)["coords"],
                            "keypoints": {"nose": point(5, 6)["coords"]}, "instance_id": "person1"}]}
    assert parse_prediction("Here: " + kp_text(instance, fence=False), W, H, "keypoint") == expected
    other = {"cat1": kp_instance("<9><9><9><9>")}
    assert parse_prediction(kp_text(instance) + "\n" + kp_text(other), W, H, "keypoint") == expected


@pytest.mark.parametrize("text", [
    "", END, "no json here" + END, "```json\n[1, 2]\n```", '```json\n"text"\n```',
    "```json\n{\"person1\": {\"bbox\": \"<1><2><3><4>\", \"keypoints\": {\"nose\": \"<1>",  # truncated
    "} backwards {",
])
def test_keypoint_text_that_is_not_a_json_object_gives_nothing(text):
    assert parse_prediction(text, W, H, "keypoint") == {}


# ---------------------------------------------------------------- properties

PHRASE = st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), min_size=1, max_size=12)
GEOM = st.integers(1, 5).flatmap(lambda n: st.lists(st.integers(0, 999), min_size=2 * n, max_size=2 * n))
GROUPS = st.lists(st.tuples(PHRASE, st.none() | st.lists(GEOM, min_size=1, max_size=4)), max_size=6)


def render(groups):
    payloads = ["None" if geoms is None else ",".join("".join(f"<{b}>" for b in g) for g in geoms)
                for _, geoms in groups]
    return ", ".join(group(p, pl) for (p, _), pl in zip(groups, payloads)) + END


def expected_official(groups, w, h):
    expected = {}
    for phrase, geoms in groups:
        entries = expected.setdefault(phrase.strip(), [])
        for g in geoms or ():
            xy = [[(g[i] / 999.0) * w, (g[i + 1] / 999.0) * h] for i in range(0, len(g), 2)]
            if len(g) == 2:
                entries.append({"type": "point", "coords": xy[0]})
            elif len(g) == 4:
                entries.append({"type": "box", "coords": xy[0] + xy[1]})
            else:
                entries.append({"type": "polygon", "coords": xy})
    return expected


SIZES = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


@settings(max_examples=150, deadline=None)
@given(GROUPS, SIZES, st.sampled_from(["detection", "pointing", "ocr_polygon", "gui_grounding"]))
def test_well_formed_responses_parse_to_what_was_written(groups, size, task):
    result = parse_prediction(render(groups), *size, task)
    expected = expected_official(groups, *size)
    assert result == expected  # exact floats: (bin / 999) * side, the official formula
    assert list(result) == list(expected)


@settings(max_examples=60, deadline=None)
@given(GROUPS, SIZES)
def test_every_prefix_parses_without_error_to_a_subset(groups, size):
    text = render(groups)
    full = parse_prediction(text, *size, "detection")
    for cut in range(0, len(text), 3):
        part = parse_prediction(text[:cut], *size, "detection")
        assert set(part) <= set(full)
        assert all(len(part[k]) <= len(full[k]) for k in part)


@settings(max_examples=100, deadline=None)
@given(GROUPS, SIZES)
def test_typed_results_agree_with_the_dictionary(groups, size):
    text = render(groups)
    official = parse_prediction(text, *size, "ocr_polygon")
    typed = parse_results(text, *size, "ocr_polygon")
    assert to_official(typed, absent=[k for k, v in official.items() if not v]) == official
    assert all(d.coords == tuple((b / 999) * size[i % 2] for i, b in enumerate(d.bins)) for d in typed)


BIN = st.integers(0, 999)
KEYPOINT = st.none() | st.tuples(BIN, BIN)
INSTANCES = st.dictionaries(
    st.from_regex(r"[a-z_]{0,6}[0-9]{0,2}", fullmatch=True),
    st.tuples(st.tuples(BIN, BIN, BIN, BIN), st.dictionaries(st.text(min_size=1, max_size=8), KEYPOINT, max_size=5)),
    max_size=4)


@settings(max_examples=100, deadline=None)
@given(INSTANCES, SIZES)
def test_keypoint_json_parses_to_what_was_written(instances, size):
    w, h = size
    doc = {iid: {"bbox": " " + " ".join(f"<{b}>" for b in bbox) + " ",
                 "keypoints": {n: "unvisible" if xy is None else f" <{xy[0]}> <{xy[1]}> " for n, xy in kps.items()}}
           for iid, (bbox, kps) in instances.items()}
    expected = {}
    for iid, (bbox, kps) in instances.items():
        letters = iid.rstrip("0123456789")
        expected.setdefault(letters or "keypoint_instance", []).append({
            "type": "keypoint",
            "bbox": [(bbox[0] / 999.0) * w, (bbox[1] / 999.0) * h, (bbox[2] / 999.0) * w, (bbox[3] / 999.0) * h],
            "keypoints": {n: "unvisible" if xy is None else [(xy[0] / 999.0) * w, (xy[1] / 999.0) * h]
                          for n, xy in kps.items()},
            "instance_id": iid})
    text = kp_text(doc)
    assert parse_prediction(text, w, h, "keypoint") == expected
    typed = parse_results(text, w, h, "keypoint")
    assert to_official(typed) == expected
