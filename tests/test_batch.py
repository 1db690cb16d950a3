"""run_batch / `rexedge batch` on a tiny bundle: every input accounted for exactly once, results
equal to plain ``inference`` calls, resumable after an interruption, COCO output in the COCO
results format."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rexedge.export.bundle import export_bundle
from rexedge.runtime.api import RexOmni
from rexedge.runtime.pipelines.batch import BatchError, collect_inputs, run_batch
from rexedge.runtime.cli import main
from rexedge.runtime.request.prompts import PromptError

CATEGORIES = ["cup", "dog"]
MAX_TOKENS = 400   # enough for the random model to finish a phrase and write boxes


@pytest.fixture(scope="module")
def bundle_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("batch") / "bundle", progress=False)


@pytest.fixture
def model(bundle_dir: Path) -> RexOmni:
    return RexOmni(bundle_dir, max_tokens=MAX_TOKENS)


def random_image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_with_detections(model: RexOmni, height: int, width: int) -> np.ndarray:
    """A random image on which the random tiny model writes at least one box (most get none)."""
    for seed in range(100, 200):
        image = random_image(seed, height, width)
        if model.inference(image, categories=CATEGORIES)[0]["detections"]:
            return image
    pytest.fail("no random image made the tiny model write a box")


@pytest.fixture
def folder(model: RexOmni, tmp_path: Path) -> tuple[Path, list[Path], dict[Path, str]]:
    """Good images (PNG and JPEG, odd sizes, one with boxes) and bad files with the reason each must give."""
    root = tmp_path / "images"
    root.mkdir()
    good = []
    for i, (h, w) in enumerate([(41, 67), (58, 70), (75, 53), (33, 99)]):
        path = root / f"{i + 1:06d}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(random_image(i, h, w)).save(path)
        good.append(path)
    Image.fromarray(image_with_detections(model, 52, 64)).save(root / "000005.png")
    good.append(root / "000005.png")
    bad = {root / "000006.png": "corrupt", root / "000007.jpg": "empty file", root / "notes.txt": "not an image"}
    (root / "000006.png").write_bytes(good[0].read_bytes()[:120])   # truncated
    (root / "000007.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not pixels")
    (root / ".hidden.png").write_bytes(good[0].read_bytes())        # hidden files are not inputs
    (root / "sub").mkdir()                                           # nor folders
    return root, good, bad


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_collect_inputs_from_folders_globs_and_lists(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "deep").mkdir()
    for name in ["a/2.png", "a/1.jpg", "a/.x.png", "a/deep/3.png", "b.png"]:
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("# images\nb.png\n\n  a/1.jpg  \nmissing.png\n" + str(tmp_path / "b.png") + "\n")
    folder = [str(tmp_path / "a" / n) for n in ("1.jpg", "2.png")]
    assert collect_inputs(tmp_path / "a") == folder
    assert collect_inputs(str(tmp_path / "a" / "**" / "*.png")) == [str(tmp_path / p) for p in ("a/2.png", "a/deep/3.png")]
    # relative lines from the list's folder; a missing one is kept (it becomes an error line); each path once
    assert collect_inputs(listing) == [str(tmp_path / p) for p in ("b.png", "a/1.jpg", "missing.png")]
    assert collect_inputs([tmp_path / "a", str(tmp_path / "a" / "1.jpg"), tmp_path / "b.png"]) == \
        folder + [str(tmp_path / "b.png")]
    for bad, message in [(tmp_path / "nope", "no such file"), (str(tmp_path / "*.gif"), "name no files"),
                         ([], "got nothing")]:
        with pytest.raises(BatchError, match=message):
            collect_inputs(bad)


def test_every_input_gets_one_line_good_ones_equal_plain_inference(model: RexOmni, bundle_dir: Path, folder,
                                                                   tmp_path: Path) -> None:
    root, good, bad = folder
    out = tmp_path / "results.jsonl"
    summary = run_batch(model, root, out, categories=CATEGORIES, progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (len(good), 0, len(bad))
    assert summary.mean_latency_s is not None and summary.mean_latency_s > 0
    lines = read_lines(out)
    assert sorted(line["image"] for line in lines) == sorted(str(p) for p in good + list(bad))
    by_image = {line["image"]: line for line in lines}
    reference = RexOmni(bundle_dir, max_tokens=MAX_TOKENS)
    for path in good:
        line = by_image[str(path)]
        assert line["status"] == "ok" and line["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        [expected] = reference.inference(str(path), categories=CATEGORIES)
        assert line["raw_output"] == expected["raw_output"]
        assert [d["bins"] for d in line["detections"]] == [list(d.bins) for d in expected["detections"]]
    assert any(by_image[str(p)]["detections"] for p in good)
    for path, reason in bad.items():
        line = by_image[str(path)]
        assert line["status"] == "error" and reason in line["error"] and "detections" not in line


def test_resume_after_an_interruption_processes_each_image_once(model: RexOmni, folder, tmp_path: Path) -> None:
    root, good, bad = folder
    out = tmp_path / "results.jsonl"
    real_run, ran = model.run, []

    def interrupted_run(prepared):
        if len(ran) == 3:
            raise KeyboardInterrupt   # Ctrl-C while the 4th image decodes
        ran.append(prepared)
        return real_run(prepared)

    model.run = interrupted_run
    with pytest.raises(KeyboardInterrupt):
        run_batch(model, root, out, categories=CATEGORIES, progress=False)
    first = read_lines(out)
    assert len([line for line in first if line["status"] == "ok"]) == 3
    # a process killed mid-write leaves half a line: it is dropped and its image done again
    with open(out, "a") as f:
        f.write(json.dumps(first[-1])[:40])

    counted: list[str] = []

    def counting_run(prepared):
        counted.append(prepared)
        return real_run(prepared)

    model.run = counting_run
    summary = run_batch(model, root, out, categories=CATEGORIES, progress=False)
    lines = read_lines(out)
    images = [line["image"] for line in lines]
    assert sorted(images) == sorted(str(p) for p in good + list(bad))    # none twice, none missing
    assert summary.skipped == len(first) and summary.done + summary.failed == len(images) - len(first)
    assert len(counted) == len(good) - 3                                 # only the images not yet done ran
    # once all are done, a third run runs nothing
    assert run_batch(model, root, out, categories=CATEGORIES, progress=False).skipped == len(images)
    assert len(counted) == len(good) - 3 and len(read_lines(out)) == len(images)
    # a changed file is a new input: its new line follows the old one
    Image.fromarray(random_image(50, 44, 61)).save(good[0])
    assert run_batch(model, root, out, categories=CATEGORIES, progress=False).done == 1
    assert [line["image"] for line in read_lines(out)].count(str(good[0])) == 2


def test_an_output_of_another_request_or_not_a_batch_file_is_refused(model: RexOmni, folder, tmp_path: Path) -> None:
    root, good, _ = folder
    out = tmp_path / "results.jsonl"
    run_batch(model, good[:1], out, categories=CATEGORIES, progress=False)
    before = out.read_bytes()
    with pytest.raises(BatchError, match="another request"):
        run_batch(model, good, out, categories=["cat"], progress=False)
    for content in (b'{"some": "thing"}\n', good[0].read_bytes(), before + b'{"half": '):
        other = tmp_path / "other.jsonl"   # someone's file given as the output is refused and left as it was
        other.write_bytes(content)
        with pytest.raises(BatchError, match="not a rexedge batch line"):
            run_batch(model, good, other, categories=CATEGORIES, progress=False)
        assert other.read_bytes() == content
    with pytest.raises(BatchError, match="points"):
        run_batch(model, good, tmp_path / "p.jsonl", task="pointing", categories=CATEGORIES, coco=tmp_path / "c.json",
                  category_ids={"cup": 1}, progress=False)
    with pytest.raises(BatchError, match="needs category_ids"):
        run_batch(model, good, tmp_path / "p.jsonl", categories=CATEGORIES, coco=tmp_path / "c.json", progress=False)
    with pytest.raises(PromptError, match="needs categories"):   # a bad request fails before any line is written
        run_batch(model, good, tmp_path / "q.jsonl", categories=[], progress=False)
    assert out.read_bytes() == before and not (tmp_path / "p.jsonl").exists() and not (tmp_path / "q.jsonl").exists()


def check_coco_results_format(results: list, image_ids: set[int], category_ids: set[int]) -> None:
    """The COCO results format for boxes: a list of {image_id, category_id, bbox [x, y, w, h], score}."""
    assert isinstance(results, list)
    for item in results:
        assert set(item) == {"image_id", "category_id", "bbox", "score"}
        assert type(item["image_id"]) is int and item["image_id"] in image_ids
        assert type(item["category_id"]) is int and item["category_id"] in category_ids
        assert len(item["bbox"]) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in item["bbox"])
        assert item["bbox"][2] >= 0 and item["bbox"][3] >= 0
        assert isinstance(item["score"], float) and 0 < item["score"] <= 1


def test_coco_output_from_the_jsonl_in_the_coco_results_format(model: RexOmni, folder, tmp_path: Path) -> None:
    root, good, _ = folder
    out, coco = tmp_path / "results.jsonl", tmp_path / "coco.json"
    run_batch(model, root, out, categories=CATEGORIES, progress=False)
    ok = [line for line in read_lines(out) if line["status"] == "ok"]
    phrases = sorted({d["phrase"].strip() for line in ok for d in line["detections"]})
    assert phrases, "no detections: the COCO check would check nothing"
    # a COCO annotation file gives both maps: image ids by file name, category ids by name
    dataset = {"images": [{"id": 1000 + i, "file_name": p.name, "width": 1, "height": 1} for i, p in enumerate(good)],
               "categories": [{"id": 7, "name": phrases[0]}], "annotations": []}
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(dataset))
    # the re-run skips every image and writes COCO from the lines already there
    summary = run_batch(model, root, out, categories=CATEGORIES, coco=coco, category_ids=annotations,
                        image_ids=annotations, progress=False)
    assert summary.skipped == len(read_lines(out)) and summary.done == 0
    results = json.loads(coco.read_text())
    check_coco_results_format(results, {1000 + i for i in range(len(good))}, {7})
    expected = []
    for line in ok:
        image_id = 1000 + [p.name for p in good].index(Path(line["image"]).name)
        for d in line["detections"]:
            if d["phrase"].strip() == phrases[0]:
                xs, ys = d["coords"][0::2], d["coords"][1::2]
                expected.append((image_id, [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], d["score"]))
    assert [r["image_id"] for r in results] == [image_id for image_id, _, _ in expected]
    assert [v for r in results for v in r["bbox"] + [r["score"]]] == pytest.approx(
        [v for _, bbox, score in expected for v in bbox + [score]])
    others = {}
    for line in ok:
        for d in line["detections"]:
            if d["phrase"].strip() != phrases[0]:
                others[d["phrase"].strip()] = others.get(d["phrase"].strip(), 0) + 1
    assert summary.unmatched == others and summary.coco_results == len(expected)


def test_coco_output_loads_in_pycocotools(model: RexOmni, folder, tmp_path: Path) -> None:
    coco_api = pytest.importorskip("pycocotools.coco", reason="pycocotools is the reference COCO reader")
    root, good, _ = folder
    out, coco = tmp_path / "results.jsonl", tmp_path / "coco.json"
    run_batch(model, root, out, categories=CATEGORIES, progress=False)
    phrases = {d["phrase"].strip() for line in read_lines(out) if line["status"] == "ok" for d in line["detections"]}
    category_ids = {phrase: i + 1 for i, phrase in enumerate(sorted(phrases))}
    summary = run_batch(model, root, out, categories=CATEGORIES, coco=coco, category_ids=category_ids,
                        progress=False)   # image ids from the numeric file names
    assert summary.coco_results > 0 and summary.unmatched == {} and summary.without_image_id == []
    ground_truth = coco_api.COCO()
    ground_truth.dataset = {"images": [{"id": int(p.stem), "width": 1, "height": 1} for p in good],
                            "categories": [{"id": i, "name": n} for n, i in category_ids.items()], "annotations": []}
    ground_truth.createIndex()
    loaded = ground_truth.loadRes(str(coco))
    assert len(loaded.getAnnIds()) == summary.coco_results
    assert all(ann["area"] >= 0 for ann in loaded.dataset["annotations"])


def test_batch_command(bundle_dir: Path, folder, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, good, bad = folder
    out, coco, categories = tmp_path / "r.jsonl", tmp_path / "coco.json", tmp_path / "categories.json"
    categories.write_text(json.dumps({"cup": 1, "dog": 2}))
    argv = ["batch", str(root / "*.png"), str(root / "*.jpg"), "--model", str(bundle_dir), "--categories", "cup,dog",
            "--out", str(out), "--coco", str(coco), "--category-ids", str(categories),
            "--max-new-tokens", str(MAX_TOKENS)]
    assert main(argv) == 0
    pngs_and_jpgs = [p for p in good + list(bad) if p.suffix in (".png", ".jpg")]
    assert sorted(line["image"] for line in read_lines(out)) == sorted(map(str, pngs_and_jpgs))
    failed = sum(p.suffix in (".png", ".jpg") for p in bad)
    assert f"done {len(good)}, skipped 0, failed {failed}" in capsys.readouterr().err
    assert isinstance(json.loads(coco.read_text()), list)
    assert main(argv) == 0
    assert f"done 0, skipped {len(pngs_and_jpgs)}, failed 0" in capsys.readouterr().err
    assert main(argv[:-6] + ["--coco", str(coco)]) == 2
    assert "needs category_ids" in capsys.readouterr().err
