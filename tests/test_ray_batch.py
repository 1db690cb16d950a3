"""run_batch_ray / `rexedge batch --ray` on a local Ray instance (2 CPUs) with the embedded demo bundle:
the same lines as the single-process run_batch image by image (timings aside), resumable, and an
actor killed mid-run loses and duplicates nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rexedge.runtime.api import RexOmni
from rexedge.runtime.pipelines.batch import BatchError, run_batch
from rexedge.runtime.cli import main
from rexedge.runtime.demo import DEMO_BUNDLE

ray = pytest.importorskip("ray", reason="the Ray run needs ray (pip install 'rexedge[ray]', in the dev extra)")
from rexedge.runtime.pipelines.ray_batch import local_actor_pids, run_batch_ray  # noqa: E402  (after the skip: ray_batch is for ray only)

CATEGORIES = ["cup", "door handle"]
OPTIONS = {"max_tokens": 200, "constrain_phrases": True}   # phrases are the categories: COCO gets results
TIMING_FIELDS = ("inference_time", "generation_time", "tokens_per_second", "timings")
KILL_WAIT_S = 120   # bounds the wait for the actors to start; no test asserts a speed


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_images(root: Path, count: int, seed: int) -> list[Path]:
    """Fresh random images of odd sizes, PNG and JPEG, named by number (COCO image ids)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        height, width = (int(v) for v in rng.integers(23, 140, 2))
        path = root / f"{i + 1:06d}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Relative inputs (the actors must read them from the driver's folder): a folder with good, corrupt,
    empty and non-image files, and a list naming a missing file."""
    monkeypatch.chdir(tmp_path)
    good = write_images(Path("images"), 7, seed=int(np.random.default_rng().integers(1 << 30)))
    Path("images/000008.png").write_bytes(good[0].read_bytes()[:150])   # corrupt (truncated)
    Path("images/000009.jpg").write_bytes(b"")                           # empty
    Path("images/readme.txt").write_text("not pixels")                   # not an image
    Path("more.txt").write_text("images/000001.png\nimages/missing.png\n")
    return ["images", "more.txt"]


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def by_image(lines: list[dict]) -> dict[str, dict]:
    """{image: its line less the timings}; every image once."""
    images = [line["image"] for line in lines]
    assert len(images) == len(set(images)), f"an image written twice: {images}"
    return {line["image"]: {k: v for k, v in line.items() if k not in TIMING_FIELDS} for line in lines}


def single_process(inputs, out: Path, **options):
    return run_batch(RexOmni(DEMO_BUNDLE, **OPTIONS), inputs, out, categories=CATEGORIES, progress=False, **options)


def test_ray_lines_equal_single_process_lines_and_resume_runs_exactly_the_deleted(inputs: list[str]) -> None:
    coco = {"category_ids": {name: i + 1 for i, name in enumerate(CATEGORIES)}}
    reference = single_process(inputs, Path("single.jsonl"), coco="single_coco.json", **coco)
    summary = run_batch_ray(DEMO_BUNDLE, inputs, "ray.jsonl", categories=CATEGORIES, model_options=OPTIONS, actors=2,
                            coco="ray_coco.json", progress=False, **coco)
    expected, got = by_image(read_lines(Path("single.jsonl"))), by_image(read_lines(Path("ray.jsonl")))
    assert got == expected
    assert len(got) == 11 and sum(line["status"] == "error" for line in got.values()) == 4
    assert got["images/missing.png"]["sha256"] is None and "No such file" in got["images/missing.png"]["error"]
    assert "empty file" in got["images/000009.jpg"]["error"]
    assert (summary.done, summary.failed, summary.skipped) == (reference.done, reference.failed, 0) == (7, 4, 0)
    assert len(summary.latencies_s) == 7 and all(latency > 0 for latency in summary.latencies_s)
    # COCO from the Ray lines: the same results (the file follows the output's order, which differs)
    assert sorted(map(json.dumps, json.loads(Path("ray_coco.json").read_text()))) == \
        sorted(map(json.dumps, json.loads(Path("single_coco.json").read_text())))
    assert summary.coco_results == reference.coco_results

    # delete an ok line, an error line and the last line; the re-run does exactly those
    lines = Path("ray.jsonl").read_text().splitlines(keepends=True)
    statuses = [json.loads(line)["status"] for line in lines]
    drop = {statuses.index("ok"), statuses.index("error"), len(lines) - 1}
    Path("ray.jsonl").write_text("".join(line for i, line in enumerate(lines) if i not in drop))
    again = run_batch_ray(DEMO_BUNDLE, inputs, "ray.jsonl", categories=CATEGORIES, model_options=OPTIONS, actors=2,
                          progress=False)
    assert again.skipped == len(lines) - len(drop) and again.done + again.failed == len(drop)
    after = read_lines(Path("ray.jsonl"))
    assert {line["image"] for line in after[-len(drop):]} == {json.loads(lines[i])["image"] for i in drop}
    assert by_image(after) == expected
    # all done: nothing runs (and no Ray work is started)
    assert run_batch_ray(DEMO_BUNDLE, inputs, "ray.jsonl", categories=CATEGORIES, model_options=OPTIONS,
                         progress=False).skipped == len(lines)
    assert len(read_lines(Path("ray.jsonl"))) == len(lines)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor processes in /proc")
def test_an_actor_killed_mid_run_loses_and_duplicates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    images = write_images(Path("images"), 24, seed=int(np.random.default_rng().integers(1 << 30)))
    out = Path("ray.jsonl")
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = run_batch_ray(DEMO_BUNDLE, "images", out, categories=CATEGORIES, model_options=OPTIONS,
                                              actors=2, progress=False)
        except BaseException as e:   # re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    killed, written_at_kill, before, after = None, None, set(), set()
    deadline = time.monotonic() + KILL_WAIT_S
    while thread.is_alive() and time.monotonic() < deadline:
        pids = local_actor_pids()
        if killed is not None:
            after |= pids
        # both actors up and the first lines in: the run is in full flow, most images still to come
        elif len(pids) == 2 and out.exists() and out.read_text().count("\n") >= 1:
            written_at_kill = out.read_text().count("\n")
            killed, before = min(pids), pids
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    thread.join(KILL_WAIT_S)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert killed is not None and written_at_kill < len(images), "the kill must land while images are left"
    assert after - before, "Ray restarts the killed actor: a new actor process"
    summary = result["summary"]
    assert (summary.done, summary.failed) == (len(images), 0)
    got = by_image(read_lines(out))   # every image once
    assert sorted(got) == sorted(str(p) for p in images)
    single_process("images", Path("single.jsonl"))
    assert got == by_image(read_lines(Path("single.jsonl")))


def test_batch_command_with_ray_and_its_option_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    images = write_images(Path("images"), 3, seed=int(np.random.default_rng().integers(1 << 30)))
    argv = ["batch", "images", "--model", "demo", "--categories", ",".join(CATEGORIES), "--constrain-phrases",
            "--max-new-tokens", str(OPTIONS["max_tokens"]), "--out", "ray.jsonl"]
    assert main(argv + ["--ray", "--actors", "1", "--max-batch", "1"]) == 0
    assert "done 3, skipped 0, failed 0" in capsys.readouterr().err
    assert main(argv + ["--ray"]) == 0
    assert "done 0, skipped 3, failed 0" in capsys.readouterr().err
    assert sorted(by_image(read_lines(Path("ray.jsonl")))) == sorted(map(str, images))
    for extra, message in [(["--ray", "--max-batch", "0"], "max_batch: expected a whole number >= 1"),
                           (["--ray", "--actors", "0"], "actors: expected a whole number >= 1"),
                           (["--ray", "--gpus-per-actor", "-1"], "gpus_per_actor: expected a number >= 0"),
                           (["--ray", "--address", "auto"], "joined a Ray cluster already"),
                           (["--actors", "2"], "--actors: options of a Ray run; add --ray")]:
        assert main(argv + extra) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(BatchError, match="does not exist"):
        run_batch_ray(tmp_path / "no-model", "images", "x.jsonl", categories=CATEGORIES)


def test_ray_is_imported_only_by_a_ray_run() -> None:
    code = ("import sys, rexedge.runtime.cli, rexedge.runtime.pipelines.batch, rexedge.runtime.api, rexedge.runtime.pipelines.ray_batch; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-P", "-c", code]).returncode == 0
