"""`rexedge demo`: the shipped sample and default bundle run without torch, and the assets are the script's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from rexedge.runtime.config import RexOmniConfig
from rexedge.export.fixtures.demo_assets import draw_sample
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.demo import DEMO_BUNDLE, DEMO_CATEGORIES, DEMO_IMAGE
from test_cli import BLOCK_HEAVY


def test_demo_runs_without_torch_and_draws_category_boxes(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "demo.json", tmp_path / "demo.png"
    argv = ["demo", "--json", str(out_json), "--annotate", str(out_png)]
    code = BLOCK_HEAVY + f"from rexedge.runtime.cli import main\nsys.exit(main({argv!r}))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr  # says plainly that the default model is not trained

    [record] = json.loads(out_json.read_text())
    categories = {c.strip() for c in DEMO_CATEGORIES.split(",")}
    assert record["detections"], "the demo model was chosen to answer with boxes"
    assert {d["phrase"] for d in record["detections"]} <= categories
    assert set(record["extracted_predictions"]) <= categories
    drawn, sample = Image.open(out_png), Image.open(DEMO_IMAGE)
    assert drawn.size == sample.size
    assert np.any(np.asarray(drawn.convert("RGB")) != np.asarray(sample.convert("RGB")))


def test_shipped_assets_are_what_the_script_makes() -> None:
    np.testing.assert_array_equal(np.asarray(Image.open(DEMO_IMAGE).convert("RGB")), np.asarray(draw_sample()))
    bundle = load_bundle(DEMO_BUNDLE)  # every file's hash checks out
    assert bundle.config == RexOmniConfig.preset("tiny")
    assert bundle.precision == "fp32"


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
