"""Generated shape scenes (rexedge.export.shapes.scenes): inside the issue's domain, reproducible, answers parse back."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rexedge.export.fixtures.tiny import write_tiny_checkpoint
from rexedge.export.shapes.evaluate import (
    EVAL_SEED,
    accuracy_table,
    average_precision,
    markdown_table,
    match_count,
    ranking_quality,
    scene_matches,
    score_scene,
    teacher_forced,
)
from rexedge.export.shapes.scenes import CATEGORIES, COLOURS, SceneError, make_scene
from rexedge.runtime.request.tokenizer import Tokenizer
from rexedge.runtime.results.parse import parse_prediction

SEEDS = range(300, 420)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(write_tiny_checkpoint(tmp_path_factory.mktemp("scenes") / "ckpt", preset="tiny"))


def box_mask(box: tuple[float, ...], width: int, height: int) -> np.ndarray:
    """Pixels covered by a box with integer edges, as a boolean image (an independent overlap reference)."""
    mask = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = True
    return mask


def test_scenes_stay_in_the_domain() -> None:
    counts: Counter[int] = Counter()
    seen: set[str] = set()
    for seed in SEEDS:
        scene = make_scene(seed)
        width, height = scene.size
        assert scene.image.dtype == np.uint8 and scene.image.shape == (height, width, 3)
        assert 160 <= width <= 640 and 160 <= height <= 640
        assert 1 <= len(scene.shapes) <= 4
        counts[len(scene.shapes)] += 1
        covered = np.zeros((height, width), dtype=bool)
        masks = []
        for shape in scene.shapes:
            x0, y0, x1, y1 = shape.box
            side = x1 - x0
            assert side == y1 - y0, "boxes are squares"
            assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height
            assert 0.15 * min(width, height) - 0.5 <= side <= 0.5 * min(width, height) + 0.5
            masks.append(box_mask(shape.box, width, height))
            covered |= masks[-1]
            seen.add(shape.category)
        for i in range(len(masks)):
            for j in range(i):
                shared = (masks[i] & masks[j]).sum()
                assert shared <= 0.15 * min(masks[i].sum(), masks[j].sum()) + 1e-9
        # the background: light (each channel 130-255 before noise of sigma <= 8)
        background = np.median(scene.image[~covered].astype(np.float32), axis=0)
        assert np.all(background >= 130 - 2)
        # prompt: every present category once, at most two absent ones, no repeats
        present = {s.category for s in scene.shapes}
        assert present <= set(scene.categories)
        assert len(scene.categories) == len(set(scene.categories))
        assert len(scene.absent) <= 2 and set(scene.absent).isdisjoint(present)
        assert set(scene.categories) <= set(CATEGORIES)
    assert set(counts) == {1, 2, 3, 4}
    assert seen == set(CATEGORIES)


def test_shapes_are_drawn_in_their_colour() -> None:
    checked = 0
    for seed in SEEDS:
        scene = make_scene(seed)
        for shape in scene.shapes:
            others = [s for s in scene.shapes if s is not shape]
            x0, y0, x1, y1 = (int(v) for v in shape.box)
            if any(not (o.box[2] <= x0 or o.box[0] >= x1 or o.box[3] <= y0 or o.box[1] >= y1) for o in others):
                continue  # overlapped: the centre may be under another shape
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            # the centre of a circle, a square and an upward triangle is inside the shape
            patch = scene.image[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).astype(np.float32).mean(axis=0)
            expected = np.array(COLOURS[shape.category.split()[0]], dtype=np.float32)
            assert np.abs(patch - expected).max() <= 20 + 3 * 8 / 3 + 1, (seed, shape, patch)
            checked += 1
    assert checked > 100


def test_scenes_are_reproducible() -> None:
    a, b, c = make_scene(7), make_scene(7), make_scene(8)
    assert np.array_equal(a.image, b.image) and a.shapes == b.shapes and a.categories == b.categories
    assert not (a.image.shape == c.image.shape and np.array_equal(a.image, c.image))


def test_curriculum_limits_the_shape_count() -> None:
    assert all(len(make_scene(seed, max_shapes=1).shapes) == 1 for seed in range(30))
    with pytest.raises(SceneError, match="max_shapes"):
        make_scene(0, max_shapes=5)


def test_answer_parses_back_to_the_boxes(tokenizer: Tokenizer) -> None:
    for seed in range(40):
        scene = make_scene(seed)
        width, height = scene.size
        text = scene.answer_text(tokenizer)
        assert text.endswith("<|im_end|>")
        parsed = parse_prediction(text, width, height, "detection")
        for category in scene.categories:
            truth = [s.box for s in scene.shapes if s.category == category]
            boxes = [item["coords"] for item in parsed.get(category, [])]
            assert len(boxes) == len(truth)
            # bins are 1/999 of a side: each parsed edge is within 0.65 px of the truth (boxes >= 24 px)
            assert match_count(boxes, truth, threshold=0.9) == len(truth)
        assert text.count("None") == len(scene.absent)


def test_scoring_counts_matches_once() -> None:
    scene = next(s for s in map(make_scene, range(100))
                 if len(s.shapes) >= 2 and sum(o.category == s.shapes[0].category for o in s.shapes) == 1)
    exact = {}
    for shape in scene.shapes:
        exact.setdefault(shape.category, []).append({"type": "box", "coords": list(shape.box)})
    assert score_scene(scene, exact) == (len(scene.shapes), len(scene.shapes), len(scene.shapes))
    first = scene.shapes[0]
    x0, y0, x1, y1 = first.box
    side = x1 - x0
    duplicated = {first.category: [{"type": "box", "coords": list(first.box)}] * 2}
    assert score_scene(scene, duplicated) == (1, 2, len(scene.shapes))
    # shifted by 40% of the side: IoU = 0.6 / 1.4 = 0.43 < 0.5
    shifted = {first.category: [{"type": "box", "coords": [x0 + 0.4 * side, y0, x1 + 0.4 * side, y1]}]}
    assert score_scene(scene, shifted) == (0, 1, len(scene.shapes))
    # shifted by 30%: IoU = 0.7 / 1.3 = 0.54
    shifted = {first.category: [{"type": "box", "coords": [x0 + 0.3 * side, y0, x1 + 0.3 * side, y1]}]}
    assert score_scene(scene, shifted) == (1, 1, len(scene.shapes))
    wrong_name = {"purple circle": [{"type": "box", "coords": list(first.box)}]}
    assert score_scene(scene, wrong_name) == (0, 1, len(scene.shapes))


def test_average_precision_by_hand() -> None:
    # hits at ranks 1 and 3 of 3 true boxes: precisions 1 and 2/3 (the miss at rank 2 is lifted
    # to 2/3 by the monotone envelope, but only hits add area): (1 + 2/3) / 3
    assert average_precision([True, False, True], truth=3) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision([True, True, False, False], truth=2) == 1.0
    # a later hit at a higher precision lifts an earlier one: rank 3 (1/3) takes rank 4's 2/4
    assert average_precision([False, False, True, True], truth=2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert average_precision([False, True, False, True, False], truth=4) == pytest.approx((0.5 + 0.5) / 4)
    assert average_precision([], truth=3) == 0.0 and average_precision([True], truth=0) == 0.0


def test_ranking_by_score_is_judged_against_random_rankings() -> None:
    rng = np.random.default_rng(11)
    flags = list(rng.random(37) < 0.4)
    informative = [(float(f) + rng.random() * 0.5, bool(f)) for f in flags]  # every hit scores above every miss
    misleading = [(-s, f) for s, f in informative]
    truth = sum(flags) + 3
    good, bad = ranking_quality(informative, truth), ranking_quality(misleading, truth)
    assert good["ap"] == pytest.approx(sum(flags) / truth, abs=1e-4)  # all hits first: precision 1 at each
    assert good["ap_random"] == bad["ap_random"]  # the same boxes, the same random rankings
    assert bad["ap"] < good["ap_random"] < good["ap"]
    with pytest.raises(ValueError, match="without a score"):
        ranking_quality([(None, True)], 1)


def test_scene_matches_pairs_each_box_with_its_score() -> None:
    scene = next(s for s in map(make_scene, range(100)) if len({o.category for o in s.shapes}) >= 2)
    first, second = scene.shapes[0], next(o for o in scene.shapes if o.category != scene.shapes[0].category)
    detections = [{"phrase": first.category, "type": "box", "coords": list(first.box), "score": 0.9},
                  {"phrase": first.category, "type": "box", "coords": list(first.box), "score": 0.8},
                  {"phrase": second.category, "type": "point", "coords": [1.0, 2.0], "score": 0.7},
                  {"phrase": second.category, "type": "box", "coords": list(second.box), "score": 0.2},
                  {"phrase": "purple circle", "type": "box", "coords": list(second.box), "score": 0.6}]
    # the duplicate and the unrequested phrase miss, the point is not a box
    assert scene_matches(scene, detections) == [(0.9, True), (0.8, False), (0.2, True), (0.6, False)]


def test_accuracy_table_runs_every_setting(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path / "ckpt", "shapes", seed=4)   # a seed whose random weights write boxes
    modes = ("exact", "constrained+mass", "parallel")
    rows = accuracy_table(tmp_path / "ckpt", tmp_path / "work", scenes=2, weights=("float", "vision-int8"),
                          decodings=modes, min_pixels=16 * 28 * 28, max_pixels=16 * 28 * 28)
    assert [(r["backend"], r["weights"], r["mode"]) for r in rows] == [
        (backend, weights, mode) for backend, weights in (("ort", "float"), ("ort", "vision-int8"), ("torch", "float"))
        for mode in modes]
    assert all(r["truth"] == rows[0]["truth"] > 0 and 0 <= r["recall"] <= 1 for r in rows)
    # the two backends run the same float model: the same answers (random weights write boxes when the
    # coordinates' total probability decides)
    assert rows[1]["predicted"] > 0
    for ort_row, torch_row in zip(rows[:3], rows[6:]):
        assert {k: v for k, v in ort_row.items() if k != "backend"} == {k: v for k, v in torch_row.items() if k != "backend"}
    assert markdown_table(rows).count("\n") == len(rows) + 1


def test_teacher_forced_reads_every_category_and_box_slot(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", "shapes", seed=5)
    report = teacher_forced(checkpoint, scenes=3, min_pixels=16 * 28 * 28, max_pixels=16 * 28 * 28)
    scenes = [make_scene(EVAL_SEED + i) for i in range(3)]
    present = sum(len(s.categories) - len(s.absent) for s in scenes)
    absent = sum(len(s.absent) for s in scenes)
    assert report["present_right"].endswith(f"/{present}") and report["absent_right"].endswith(f"/{absent}")
    assert all(0 <= error <= 999 for error in report["slot_error"].values())
    assert report["slot_argmax_error"].keys() == report["slot_error"].keys()
    assert all(0 <= error <= 999 for error in report["slot_argmax_error"].values())
    for slot, mass in report["lookup_mass"].items():   # attention shares
        assert 0 <= mass and 0 <= report["lookup_mass_other_shapes"][slot] and mass + report["lookup_mass_other_shapes"][slot] <= 1.0001
