"""Offline batches: many images in, one JSON line per image out, resumable (``RexOmni.batch``).

    model = RexOmni("bundle")
    summary = model.batch("photos/", "results.jsonl", task="detection", categories=["person", "car"],
                          coco="results_coco.json", category_ids={"person": 1, "car": 3})
    print(summary)   # done 120, skipped 0, failed 2, mean latency 850.1 ms

Inputs (``collect_inputs``): a folder (every file directly in it, hidden ones excepted:
a file that is not an image becomes an error line, so narrow with a glob if the folder
holds other files), a glob (``photos/**/*.jpg``), a text file of paths (``.txt`` or
``.lst``: one per line, ``#`` comments, relative paths from the list's folder), a single
image, or a list of any of these.

A model made with ``max_batch=N`` decodes N images together (``RexOmni.run_many``; a finished image's
slot takes the next at once); the lines are the same and still written in input order (a line waits
for the images before it), a bad image still fails alone.

Output: one line per image, written and flushed as soon as it is done:
- ``{"image", "sha256", "status": "ok", "request", <the result fields>, "detections"}``
- ``{"image", "sha256", "status": "error", "request", "error": "<type>: <reason>"}`` for a
  file that is missing, corrupt, empty or not an image, or any other failure of that
  image; the run goes on.
A re-run with the same output skips every image already there with the same path and
content hash (an error line counts as done: the same bytes fail the same way; delete the
line to retry it). A line cut short by an interrupted run is removed and its image
processed again. The output must have been written for the same request (task,
categories, ...); resuming assumes the same model.

COCO (``coco=``, ``category_ids=``): at the end every ok line of the output (earlier
runs' included) is written in the COCO results format through ``rexedge.runtime.results.coco``;
phrases without a category id are counted in ``BatchSummary.unmatched``. Image ids come
from ``image_ids`` ({file name or path: id}, or a COCO annotation file's "images"), else
from a numeric file name (``000000397133.jpg`` -> 397133).

Across machines: ``rexedge.runtime.pipelines.ray_batch`` runs the same plan on Ray actors, building
each line with ``image_record`` and writing it with ``write_record``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from tqdm import tqdm

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.preprocess import ImageError
from rexedge.runtime.request.prompts import build_task_prompt, keypoint_names
from rexedge.runtime.results.detections import detections_from_json
from rexedge.runtime.results.result import Result

if TYPE_CHECKING:
    from rexedge.runtime.api import PreparedRequest, RexOmni

K = TypeVar("K")
LIST_SUFFIXES = (".txt", ".lst")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
RECORD_START = b'{"image": '   # how every line starts (json.dumps of a dict whose first key is "image")
# visual prompts are checked per image against its size; for the up-front check of the request any box fits
_ANY_SIZE = (1 << 30, 1 << 30)


class BatchError(RexEdgeError):
    """Batch inputs, output file or COCO options that cannot be used (raised before any image runs)."""


@dataclass
class BatchSummary:
    out: Path
    done: int = 0                 # images run in this call
    skipped: int = 0              # already in the output
    failed: int = 0               # error lines written in this call
    latencies_s: list[float] = field(default_factory=list, repr=False)
    coco: Path | None = None
    coco_results: int = 0
    unmatched: dict[str, int] = field(default_factory=dict)  # phrase -> results left out of the COCO file
    without_image_id: list[str] = field(default_factory=list)  # ok images left out of the COCO file

    @property
    def mean_latency_s(self) -> float | None:
        return sum(self.latencies_s) / len(self.latencies_s) if self.latencies_s else None

    def __str__(self) -> str:
        mean = "-" if self.mean_latency_s is None else f"{self.mean_latency_s * 1e3:.1f} ms"
        text = f"done {self.done}, skipped {self.skipped}, failed {self.failed}, mean latency {mean}; wrote {self.out}"
        if self.coco is not None:
            text += f"; {self.coco_results} COCO results in {self.coco}"
            if self.unmatched:
                text += f"; phrases without a category id: {self.unmatched}"
            if self.without_image_id:
                text += f"; {len(self.without_image_id)} images without an image id: {self.without_image_id[:3]}"
        return text


def collect_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The image paths named by ``inputs`` (see the module docstring), in order, each once."""
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs:
        raise BatchError("inputs: expected a folder, a glob, a list file or images, got nothing")
    paths: dict[str, None] = {}
    for spec in specs:
        for path in _expand(os.fspath(spec)):
            paths.setdefault(path)
    if not paths:
        raise BatchError(f"inputs: {', '.join(map(os.fspath, specs))} name no files")
    return list(paths)


def _expand(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return _read_list(path)
        return [spec]
    if glob.has_magic(spec):
        return sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    raise BatchError(f"inputs: {spec}: no such file or folder, and not a glob")


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"inputs: {path}: cannot read the list of paths ({e})") from None
    listed = [line.strip() for line in lines]
    # listed paths that do not exist are kept: they become error lines, never silently lost
    return [str(path.parent / line) if not os.path.isabs(line) else line
            for line in listed if line and not line.startswith("#")]


@dataclass
class BatchPlan:
    """What a run has to do, checked before any image runs: shared by ``run_batch`` and the Ray run."""
    out: Path
    request: dict[str, Any]
    todo: list[str]               # input paths not yet in the output, in input order
    summary: BatchSummary         # ``skipped`` already counted
    coco: _CocoPlan | None


def plan_batch(inputs: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike,
               task: str = "detection", categories: Any = None, keypoint_type: str | None = None,
               visual_prompt_boxes: Any = None, *, coco: str | os.PathLike | None = None,
               category_ids: Mapping[str, int] | str | os.PathLike | None = None,
               image_ids: Mapping[str, int] | str | os.PathLike | None = None) -> BatchPlan:
    """The request, the images still to run and the COCO options, with every check a run makes up front."""
    request = {"task": task, "categories": categories, "keypoint_type": keypoint_type,
               "visual_prompt_boxes": visual_prompt_boxes}
    request = json.loads(json.dumps(request))   # as it reads back from the file (tuples become lists)
    # a bad request would fail every image alike: refuse it before writing anything
    build_task_prompt(task, categories, keypoint_type, visual_prompt_boxes, _ANY_SIZE)
    paths = collect_inputs(inputs)
    out = Path(out)
    coco_plan = _plan_coco(task, keypoint_type, paths, coco, category_ids, image_ids)
    done_keys = _resume(out, request)
    summary = BatchSummary(out)
    todo = []
    for path in paths:
        if path in done_keys and _sha256_or_none(path) in done_keys[path]:
            summary.skipped += 1
        else:
            todo.append(path)
    return BatchPlan(out, request, todo, summary, coco_plan)


def run_batch(model: RexOmni, inputs: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike,
              task: str = "detection", categories: Any = None, keypoint_type: str | None = None,
              visual_prompt_boxes: Any = None, *, coco: str | os.PathLike | None = None,
              category_ids: Mapping[str, int] | str | os.PathLike | None = None,
              image_ids: Mapping[str, int] | str | os.PathLike | None = None,
              progress: bool = True) -> BatchSummary:
    """Run ``model`` on every input image, appending one JSON line per image to ``out``."""
    plan = plan_batch(inputs, out, task, categories, keypoint_type, visual_prompt_boxes, coco=coco,
                      category_ids=category_ids, image_ids=image_ids)
    return run_plan(model, plan, progress)


def run_plan(model: RexOmni, plan: BatchPlan, progress: bool = True) -> BatchSummary:
    """Run a plan of :func:`plan_batch` (made before the model loaded, so a bad request costs no load)."""
    todo, request = plan.todo, plan.request
    with open(plan.out, "a", encoding="utf-8") as sink, \
            ThreadPoolExecutor(1, thread_name_prefix="rexedge-batch") as pool, \
            tqdm(total=len(todo), unit="img", desc="batch", disable=not progress) as bar:
        if model.max_batch == 1:
            for path, prepared in _prepared_ahead(model, todo, request, pool):
                write_record(sink, plan.summary, image_record(model, path, request, prepared))
                bar.update(1)
                bar.set_postfix(failed=plan.summary.failed, refresh=False)
        else:
            # decoded max_batch at a time, finishing in any order; lines are written in input order
            finished: dict[int, dict[str, Any]] = {}
            written = 0
            for index, record in image_records(model, enumerate(_prepared_ahead(model, todo, request, pool)), request):
                finished[index] = record
                while written in finished:
                    write_record(sink, plan.summary, finished.pop(written))
                    written += 1
                    bar.update(1)
                    bar.set_postfix(failed=plan.summary.failed, refresh=False)
    return finish_batch(plan)


Prepared = tuple[str | None, "PreparedRequest | None", Exception | None]   # what prepare_image gives


def _prepared_ahead(model: RexOmni, todo: list[str], request: dict[str, Any], pool: ThreadPoolExecutor
                    ) -> Iterator[tuple[str, Prepared]]:
    """(path, prepare_image's result) for every path; the next image is hashed and prepared on ``pool``
    while the current one runs on the model."""
    pending: Future | None = pool.submit(prepare_image, model, todo[0], request) if todo else None
    for index, path in enumerate(todo):
        assert pending is not None
        prepared = pending.result()
        pending = pool.submit(prepare_image, model, todo[index + 1], request) if index + 1 < len(todo) else None
        yield path, prepared


def image_records(model: RexOmni, items: Iterable[tuple[K, tuple[str, Prepared]]], request: dict[str, Any]
                  ) -> Iterator[tuple[K, dict[str, Any]]]:
    """(key, output line) of each (key, (path, prepare_image's result)), decoded ``model.max_batch`` at a
    time (``RexOmni.run_many``), in the order they finish; a bad image is its error line, never raised."""
    paths: dict[Any, tuple[str, str | None]] = {}

    def requests() -> Iterator[tuple[K, PreparedRequest | Exception]]:
        for key, (path, (sha256, ready, error)) in items:
            paths[key] = (path, sha256)
            yield key, ready if ready is not None else error

    for key, outcome in model.run_many(requests()):
        path, sha256 = paths.pop(key)
        yield key, _record(path, sha256, request, outcome)


def image_record(model: RexOmni, path: str, request: dict[str, Any],
                 prepared: tuple[str | None, PreparedRequest | None, Exception | None] | None = None
                 ) -> dict[str, Any]:
    """The output line of one image; never raises for a bad image.

    ``prepared``: what ``prepare_image`` gave for it, when it ran ahead on another thread."""
    sha256, request_ready, error = prepare_image(model, path, request) if prepared is None else prepared
    outcome: dict[str, Any] | Exception | None = error
    if request_ready is not None:
        try:
            outcome = model.run(request_ready)
        except Exception as e:  # one image's failure is its error line; the run goes on
            outcome = e
    return _record(path, sha256, request, outcome)


def _record(path: str, sha256: str | None, request: dict[str, Any], outcome: dict[str, Any] | Exception
            ) -> dict[str, Any]:
    """The output line of an image from its result dictionary, or its error line."""
    record: dict[str, Any] = {"image": path, "sha256": sha256}
    if isinstance(outcome, Exception):
        record.update(status="error", request=request, error=f"{type(outcome).__name__}: {outcome}")
    else:
        record.update(status="ok", request=request, **Result.from_official(outcome).to_json())
    return record


def write_record(sink: TextIO, summary: BatchSummary, record: Mapping[str, Any]) -> None:
    """Appends one image's line and flushes it (an interruption loses nothing done); counts it in ``summary``."""
    sink.write(json.dumps(record) + "\n")
    sink.flush()
    if record["status"] == "ok":
        summary.done += 1
        summary.latencies_s.append(record["inference_time"])
    else:
        summary.failed += 1


def finish_batch(plan: BatchPlan) -> BatchSummary:
    """Writes the COCO file when asked (from every ok line of the output); the run's summary."""
    if plan.coco is not None:
        _write_coco(plan.out, plan.request, plan.coco, plan.summary)
    return plan.summary


def prepare_image(model: RexOmni, path: str, request: dict[str, Any]
                  ) -> tuple[str | None, PreparedRequest | None, Exception | None]:
    """(sha256, prepared request, None), or (sha256 or None, None, the error) for a bad file."""
    try:
        sha256 = _sha256(path)
    except OSError as e:
        return None, None, e
    if sha256 == EMPTY_SHA256:
        return sha256, None, ImageError(f"{path}: empty file (0 bytes), expected an image")
    try:
        return sha256, model.prepare(path, **request), None
    except Exception as e:
        return sha256, None, e


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_or_none(path: str) -> str | None:
    try:
        return _sha256(path)
    except OSError:
        return None   # a missing file: its earlier error line has sha256 null


def _resume(out: Path, request: dict[str, Any]) -> dict[str, set[str | None]]:
    """{image path: content hashes} already in ``out``; drops a last line cut short by an interruption."""
    if out.is_dir():
        raise BatchError(f"out: {out} is a folder, expected a .jsonl file")
    if not out.exists():
        return {}
    data = out.read_bytes()
    complete = data.rfind(b"\n") + 1
    done: dict[str, set[str | None]] = {}
    lines = data[:complete].decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        record = _parse_record(out, number, line)
        if record["request"] != request:
            raise BatchError(f"out: {out} line {number} was written for another request ({record['request']}); "
                             f"this run asks {request}: choose another output file")
        done.setdefault(record["image"], set()).add(record["sha256"])
    if complete < len(data):
        # only a line of ours cut short is removed; anything else is someone's file, left alone
        if not data[complete:].startswith(RECORD_START):
            raise BatchError(f"out: {out} line {len(lines) + 1} is not a rexedge batch line; choose another output file")
        with open(out, "r+b") as f:
            f.truncate(complete)
    return done


def _parse_record(out: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or not {"image", "sha256", "status", "request"} <= record.keys():
        raise BatchError(f"out: {out} line {number} is not a rexedge batch line; choose another output file")
    return record


@dataclass(frozen=True)
class _CocoPlan:
    path: Path
    category_ids: dict[str, int]
    image_ids: dict[str, int]   # file name or path -> image id
    keypoint_names: tuple[str, ...] | None

    def image_id(self, path: str) -> int | None:
        """The id given for the path or its file name, else a numeric file name's; None: left out of the file."""
        image_id = self.image_ids.get(path, self.image_ids.get(Path(path).name))
        stem = Path(path).stem
        return int(stem) if image_id is None and stem.isdigit() else image_id


def _plan_coco(task: str, keypoint_type: str | None, paths: list[str], coco: str | os.PathLike | None,
               category_ids: Mapping[str, int] | str | os.PathLike | None,
               image_ids: Mapping[str, int] | str | os.PathLike | None) -> _CocoPlan | None:
    """Checks the COCO options before any image runs, rather than failing at the end."""
    if coco is None:
        if category_ids is not None or image_ids is not None:
            raise BatchError("category_ids / image_ids are for the COCO output: give coco= (--coco OUT.json) too")
        return None
    if category_ids is None:
        raise BatchError("coco: needs category_ids, {phrase: id} or a COCO annotation file (--category-ids MAP.json)")
    if task in ("pointing", "gui_pointing"):
        raise BatchError(f"coco: task {task!r} answers with points, which the COCO results format cannot hold")
    categories = _load_ids(category_ids, "categories", "name", "category_ids")
    by_name = _load_ids(image_ids, "images", "file_name", "image_ids") if image_ids is not None else {}
    plan = _CocoPlan(Path(coco), categories, by_name, keypoint_names(keypoint_type) if task == "keypoint" else None)
    if all(plan.image_id(path) is None for path in paths):
        raise BatchError("coco: no input has an image id: give image_ids (--image-ids MAP.json) with their file "
                         "names, or name the files by their ids (000000397133.jpg)")
    return plan


def _load_ids(source: Mapping[str, int] | str | os.PathLike, section: str, key: str, what: str) -> dict[str, int]:
    """{name: id} from a mapping, a JSON file holding one, or a COCO annotation file's ``section``."""
    if isinstance(source, Mapping):
        data: Any = source
    else:
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BatchError(f"{what}: cannot read {source} as JSON ({e})") from None
    if isinstance(data, Mapping) and isinstance(data.get(section), list):
        try:
            data = {entry[key]: entry["id"] for entry in data[section]}
        except (KeyError, TypeError):
            raise BatchError(f"{what}: {source} has a {section!r} list whose entries lack {key!r} / 'id'") from None
    if not isinstance(data, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in data.items()):
        raise BatchError(f"{what}: expected {{name: int id}} or a COCO annotation file with {section!r}")
    return dict(data)


def _write_coco(out: Path, request: dict[str, Any], plan: _CocoPlan, summary: BatchSummary) -> None:
    from rexedge.runtime.results.coco import to_coco_results

    latest: dict[str, dict[str, Any]] = {}   # a changed image has a newer line: it wins
    with open(out, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            record = _parse_record(out, number, line)
            if record["status"] == "ok" and record["request"] == request:
                latest[record["image"]] = record
    coco: list[dict[str, Any]] = []
    for path, record in latest.items():
        image_id = plan.image_id(path)
        if image_id is None:
            summary.without_image_id.append(path)
            continue
        results = to_coco_results(detections_from_json(record["detections"]), image_id,
                                  plan.category_ids, plan.keypoint_names)
        coco += results.results
        for phrase, count in results.unmatched.items():
            summary.unmatched[phrase] = summary.unmatched.get(phrase, 0) + count
    plan.path.write_text(json.dumps(coco) + "\n", encoding="utf-8")
    summary.coco, summary.coco_results = plan.path, len(coco)
