"""`rexedge detect` in subprocesses: output files, one-line errors, a bad image among good ones, no torch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rexedge.export.bundle import export_bundle
from rexedge.runtime.api import RexOmni
from rexedge.runtime.bundle import MANIFEST, manifest_digest
from rexedge.runtime.results.detections import detections_to_json

OFFICIAL_KEYS = {"success", "image_size", "resized_size", "task", "prompt", "raw_output", "extracted_predictions",
                 "inference_time", "num_output_tokens", "num_prompt_tokens", "generation_time", "tokens_per_second"}
BLOCK_HEAVY = ("import sys\n"
               "for name in ('torch', 'onnx', 'safetensors', 'transformers'):\n"
               "    sys.modules[name] = None  # any import of them fails\n")


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rexedge.runtime.cli", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def workdir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle, a bundle of another format version, a checkpoint, and good and bad image files."""
    root = tmp_path_factory.mktemp("cli")
    export_bundle(tiny_checkpoint, root / "bundle", progress=False)
    shutil.copytree(root / "bundle", root / "old_bundle")
    manifest = json.loads((root / "old_bundle" / MANIFEST).read_text())
    manifest["format_version"] = 0
    manifest["manifest_sha256"] = manifest_digest(manifest)  # a consistent manifest, only older
    (root / "old_bundle" / MANIFEST).write_text(json.dumps(manifest))
    shutil.copytree(tiny_checkpoint, root / "checkpoint")
    (root / "empty_dir").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((90, 150, 3)) * 255).astype(np.uint8)).save(root / "image.png")
    (root / "empty.png").write_bytes(b"")
    (root / "garbage.png").write_bytes(rng.bytes(300))
    return root


DETECT = ("detect", "image.png", "--model", "bundle")
ERRORS = {
    "unreadable image": (("detect", "garbage.png", "--model", "bundle", "--categories", "cup"),
                         "garbage.png: not an image file Pillow can read"),
    "empty image": (("detect", "empty.png", "--model", "bundle", "--categories", "cup"), "empty.png: "),
    "missing image": (("detect", "missing.png", "--model", "bundle", "--categories", "cup"),
                      "missing.png: no such image file"),
    "missing model": (("detect", "image.png", "--model", "nothere", "--categories", "cup"),
                      "nothere: no such bundle directory"),
    "not a checkpoint": (("detect", "image.png", "--model", "empty_dir", "--backend", "torch", "--categories", "cup"),
                         "empty_dir: no config.json (expected a Rex-Omni checkpoint directory)"),
    "not a bundle": (("detect", "image.png", "--model", "checkpoint", "--categories", "cup"),
                     "checkpoint is not a rexedge bundle"),
    "bundle of another version": (("detect", "image.png", "--model", "old_bundle", "--categories", "cup"),
                                  "bundle format version 0, this rexedge reads version 1"),
    "unknown task": ((*DETECT, "--task", "segmentation", "--categories", "cup"), "unknown task 'segmentation'"),
    "unknown backend": ((*DETECT, "--backend", "onnx", "--categories", "cup"), "unknown backend 'onnx'"),
    "no categories": (DETECT, "task 'detection' needs categories"),
    "no keypoint type": ((*DETECT, "--task", "keypoint", "--categories", "person"), "needs keypoint_type"),
    "no visual prompt": ((*DETECT, "--task", "visual_prompting"), "visual_prompting needs --visual-prompt-boxes"),
    "box outside the image": ((*DETECT, "--task", "visual_prompting", "--visual-prompt-boxes", "10,10,151,50"),
                              "image.png: visual prompt box 0 [10.0, 10.0, 151.0, 50.0] lies outside the 150x90"),
    "box with x1 < x0": ((*DETECT, "--task", "visual_prompting", "--visual-prompt-boxes", "5,5,40,40;50,5,20,40"),
                         "visual prompt box 1 [50.0, 5.0, 20.0, 40.0] has x1 < x0"),
    "malformed box": ((*DETECT, "--task", "visual_prompting", "--visual-prompt-boxes", "1,2,3"),
                      "--visual-prompt-boxes must be 'x0,y0,x1,y1;x0,y0,x1,y1' in pixels"),
    "json into a missing folder": ((*DETECT, "--categories", "cup", "--json", "no/such/dir/out.json"),
                                   "--json no/such/dir/out.json: the directory"),
    "annotate to an unknown format": ((*DETECT, "--categories", "cup", "--annotate", "out.xyz"),
                                      "--annotate out.xyz: not an image file name Pillow can write"),
    "no new tokens": ((*DETECT, "--categories", "cup", "--max-new-tokens", "0"),
                      "max_new_tokens must be a positive integer, got 0"),
}


@pytest.fixture(scope="module")
def error_runs(workdir: Path) -> dict[str, tuple[int, str, str]]:
    """Every error case, run as concurrent processes."""
    running = {name: cli(*args, cwd=workdir) for name, (args, _) in ERRORS.items()}
    results = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=120)
        results[name] = (process.returncode, out, err)
    return results


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_and_a_non_zero_exit(error_runs: dict, case: str) -> None:
    returncode, _, stderr = error_runs[case]
    assert "Traceback" not in stderr, stderr
    assert returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rexedge detect: error: "), stderr
    assert ERRORS[case][1] in lines[0]


def find_answer(bundle: Path, folder: Path) -> tuple[Path, dict]:
    """An image file the tiny model answers with at least one point (most random images get <|im_end|>)."""
    model = RexOmni(bundle, max_tokens=400)
    for seed in range(150):
        rng = np.random.default_rng(seed)
        height, width = rng.integers(40, 300, 2)
        path = folder / f"frame{seed}.png"
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)
        [result] = model.inference(str(path), task="pointing", categories=["cup", "door handle"])
        if result["detections"]:
            return path, result
        path.unlink()
    pytest.fail("no image made the tiny model answer with a point")


def test_detect_writes_json_and_an_annotated_png_without_torch(workdir: Path, tmp_path: Path) -> None:
    image, expected = find_answer(workdir / "bundle", tmp_path)
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    argv = ["detect", str(image), "--model", str(workdir / "bundle"), "--task", "pointing", "--categories",
            "cup,door handle", "--max-new-tokens", "400", "--json", str(out_json), "--annotate", str(out_png)]
    code = BLOCK_HEAVY + f"from rexedge.runtime.cli import main\nsys.exit(main({argv!r}))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""

    [record] = json.loads(out_json.read_text())
    assert set(record) >= OFFICIAL_KEYS | {"image", "detections", "absent", "stop_reason", "timings"}
    assert record["image"] == str(image) and record["success"] is True
    # the same answer as the API in this process gives
    for key in ("raw_output", "prompt", "num_output_tokens", "stop_reason", "absent"):
        assert record[key] == expected[key], key
    assert record["image_size"] == list(expected["image_size"])
    assert record["extracted_predictions"] == json.loads(json.dumps(expected["extracted_predictions"]))
    assert record["detections"] == json.loads(json.dumps(detections_to_json(expected["detections"])))

    source, drawn = Image.open(image), Image.open(out_png)
    assert drawn.format == "PNG" and drawn.size == source.size
    assert np.any(np.asarray(drawn.convert("RGB")) != np.asarray(source.convert("RGB"))), "nothing was drawn"


def test_a_bad_image_is_recorded_and_the_others_run(workdir: Path, tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "out.json", tmp_path / "drawn.png"
    process = cli("detect", "image.png", "garbage.png", "image.png", "--model", "bundle", "--categories", "cup",
                  "--json", str(out_json), "--annotate", str(out_png), cwd=workdir)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("rexedge detect: error: 1 of 3 images failed: "
                                               "garbage.png: not an image file Pillow can read")
    records = json.loads(out_json.read_text())
    assert [r["image"] for r in records] == ["image.png", "garbage.png", "image.png"]
    assert [r["success"] for r in records] == [True, False, True]
    assert records[1]["error"] == "garbage.png: not an image file Pillow can read"
    assert records[0]["raw_output"] == records[2]["raw_output"]
    # one drawing per image that ran, numbered by its place in the list
    assert sorted(p.name for p in tmp_path.glob("drawn_*.png")) == ["drawn_0.png", "drawn_2.png"]


@pytest.mark.parametrize("preset, expected", [(None, "4"), ("9", "9")])
def test_openblas_workers_sleep_at_once_unless_the_user_says_otherwise(tiny_checkpoint: Path, preset: str | None,
                                                                       expected: str) -> None:
    """The command sets OPENBLAS_THREAD_TIMEOUT before anything loads numpy (OpenBLAS reads it once, then)."""
    argv = ["prompt", "--model", str(tiny_checkpoint), "--task", "detection", "--categories", "cup",
            "--image-size", "64x48"]
    code = ("import os, sys\nfrom rexedge.runtime.cli import main\n"
            "assert 'numpy' not in sys.modules, 'numpy loaded before main()'\n"
            f"status = main({argv!r})\n"
            "print(status, 'numpy' in sys.modules, os.environ['OPENBLAS_THREAD_TIMEOUT'], file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.split() == ["0", "True", expected]


@pytest.mark.parametrize("images, loads", [(["missing.png"], False), (["empty.png", "garbage.png"], False),
                                           (["missing.png", "image.png"], True)])
def test_images_are_checked_before_the_model_loads(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture, images: list[str], loads: bool):
    """A request whose every image is unreadable (or whose visual prompt lies outside every image) fails
    without loading the model: with a 3B bundle that is a minute saved."""
    from rexedge.runtime import api
    from rexedge.runtime.cli import main

    constructed = []
    real = api.RexOmni

    def counting(*args, **kwargs):
        constructed.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "RexOmni", counting)
    monkeypatch.chdir(workdir)
    status = main(["detect", *images, "--model", "bundle", "--categories", "cup"])
    assert status == 2
    assert len(constructed) == int(loads)
    assert ("no such image file" in capsys.readouterr().err) == ("missing.png" in images)


def test_a_visual_prompt_outside_every_image_fails_before_the_model_loads(workdir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture):
    from rexedge.runtime import api
    from rexedge.runtime.cli import main

    monkeypatch.setattr(api, "RexOmni", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(workdir)
    status = main(["detect", "image.png", "--model", "bundle", "--task", "visual_prompting",
                   "--visual-prompt-boxes", "10,10,151,50"])
    assert status == 2
    assert "image.png: visual prompt box 0 [10.0, 10.0, 151.0, 50.0] lies outside the 150x90" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["batch", "nothere/", "--out", "out.jsonl", "--categories", "cup"], "inputs: nothere/: no such file or folder"),
    (["batch", "image.png", "--out", "out.jsonl"], "task 'detection' needs categories"),
    (["batch", "image.png", "--out", "out.jsonl", "--categories", "cup", "--coco", "c.json"], "coco: needs category_ids"),
    (["video", "missing.mp4", "--out", "out.jsonl", "--categories", "cup"], "missing.mp4: no such video file"),
    (["video", "empty_dir", "--out", "out.jsonl", "--categories", "cup"], "empty_dir: is a directory"),
    (["video", "image.png", "--out", "out.jsonl", "--task", "segmentation", "--categories", "cup"],
     "unknown task 'segmentation'"),
    (["video", "image.png", "--out", "out.jsonl", "--task", "visual_prompting"],
     "visual_prompting needs --visual-prompt-boxes"),
    (["video", "image.png", "--out", "out.jsonl", "--categories", "cup", "--annotate", "boxes.gif"],
     "boxes.gif: expected a .mp4 or .avi file"),
])
def test_batch_and_video_requests_are_checked_before_the_model_loads(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list[str], message: str):
    from rexedge.runtime import api
    from rexedge.runtime.cli import main

    monkeypatch.setattr(api, "RexOmni", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(workdir)
    assert main([*argv, "--model", "bundle"]) == 2
    assert message in capsys.readouterr().err
    assert not (workdir / "out.jsonl").exists()


def test_the_load_time_is_reported(workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    from rexedge.runtime.cli import main

    monkeypatch.chdir(workdir)
    assert main([*DETECT, "--categories", "cup"]) == 0
    assert re.search(r"^loaded bundle \(ort\) in \d+\.\d s$", capsys.readouterr().err, re.MULTILINE)
