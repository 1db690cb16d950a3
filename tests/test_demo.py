"""`rexedge demo`: the shipped sample and default bundle run without torch, the assets are the script's, and
the shipped model reaches its accuracy target on fresh generated scenes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import BLOCK_HEAVY

from rexedge.export.fixtures.demo_assets import demo_scene
from rexedge.export.shapes.evaluate import evaluate_bundle, iou
from rexedge.export.shapes.scenes import MAX_PIXELS, MIN_PIXELS
from rexedge.export.shapes.train import TRAINABLE_PRESETS
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.demo import DEMO_BUNDLE, DEMO_CATEGORIES, DEMO_IMAGE, DEMO_MODEL


def test_demo_runs_without_torch_and_draws_category_boxes(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "demo.json", tmp_path / "demo.png"
    argv = ["demo", "--json", str(out_json), "--annotate", str(out_png)]
    code = BLOCK_HEAVY + f"from rexedge.runtime.cli import main\nsys.exit(main({argv!r}))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == f"rexedge demo: the embedded default model is {DEMO_MODEL}."

    [record] = json.loads(out_json.read_text())
    categories = {c.strip() for c in DEMO_CATEGORIES.split(",")}
    # the trained model finds the scene's shapes and nothing of the absent category
    scene = demo_scene()
    found = {d["phrase"]: d["coords"] for d in record["detections"]}
    assert set(found) == {s.category for s in scene.shapes} < categories
    for shape in scene.shapes:
        assert iou(found[shape.category], shape.box) >= 0.5, (shape, found)
    assert set(record["extracted_predictions"]) <= categories
    drawn, sample = Image.open(out_png), Image.open(DEMO_IMAGE)
    assert drawn.size == sample.size
    assert np.any(np.asarray(drawn.convert("RGB")) != np.asarray(sample.convert("RGB")))


def test_shipped_assets_are_what_the_script_makes() -> None:
    np.testing.assert_array_equal(np.asarray(Image.open(DEMO_IMAGE).convert("RGB")), np.asarray(demo_scene().image))
    bundle = load_bundle(DEMO_BUNDLE)  # every file's hash checks out
    assert bundle.config in [RexOmniConfig.preset(name) for name in TRAINABLE_PRESETS if name != "tiny"]
    assert bundle.precision == "fp32"
    assert bundle.pixels == (MIN_PIXELS, MAX_PIXELS)   # the sizes it was trained on, its default
    assert sum(f.stat().st_size for f in DEMO_BUNDLE.iterdir()) <= 20 * 2**20


# the target: recall and precision at IoU 0.5 both >= 0.8, structured decoding, on fresh
# generated scenes (seeds never used in training); 40 scenes hold ~100 shapes
@pytest.mark.parametrize("decoding,options", [("structured", {}), ("structured", {"constrain_phrases": True}),
                                              ("structured", {"constrain_phrases": True, "none_by_mass": True})])
def test_shipped_model_finds_the_shapes_of_fresh_scenes(decoding: str, options: dict) -> None:
    result = evaluate_bundle(DEMO_BUNDLE, scenes=40, backend="ort", decoding=decoding, **options)
    assert result["truth"] > 80
    assert result["recall"] >= 0.8 and result["precision"] >= 0.8, result


def test_model_demo_names_the_embedded_bundle_and_a_checkpoint_gets_a_hint(tmp_path: Path,
                                                                          tiny_checkpoint: Path) -> None:
    out = tmp_path / "out.json"
    argv = ["detect", str(DEMO_IMAGE), "--model", "demo", "--categories", DEMO_CATEGORIES, "--constrain-phrases",
            "--max-new-tokens", "64", "--json", str(out)]
    result = subprocess.run([sys.executable, "-m", "rexedge.runtime.cli", *argv], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    [record] = json.loads(out.read_text())
    assert record["success"] and record["image_size"] == list(Image.open(DEMO_IMAGE).size)

    argv = ["detect", str(DEMO_IMAGE), "--model", str(tiny_checkpoint), "--categories", "cup"]
    result = subprocess.run([sys.executable, "-m", "rexedge.runtime.cli", *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "not a rexedge bundle (it holds a checkpoint: run it with the torch backend (--backend torch)" in result.stderr
