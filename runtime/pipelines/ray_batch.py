"""Offline batches across a Ray cluster: ``rexedge batch ... --ray`` (``pip install 'rexedge[ray]'``).

    summary = run_batch_ray("bundle", "photos/", "results.jsonl", categories=["person", "car"],
                            actors=4, model_options={"max_tokens": 1024})

The same contract as ``rexedge.runtime.pipelines.batch.run_batch``, record for record: the driver lists
the inputs, skips what the output already holds and checks the request and the COCO options
(``plan_batch``); Ray Data spreads the paths to be done over a pool of actors, each holding
its own ``RexOmni`` (loaded from ``model_path`` on its node) and building each image's line
with ``image_record``; the driver appends the lines as they stream back (an interruption
loses nothing already written), then writes the COCO file. Lines come in the order the
actors finish, not the input order.

Faults: a bad image is an error line, as in ``run_batch``. An actor whose process dies is
restarted by Ray and its in-flight images are run again (Ray Data's actor pools default to
``max_restarts=-1`` and ``max_task_retries=-1``): Ray's retries are at-least-once, so the driver writes each path
once per run, whatever comes back twice.

Files: the actors open the paths as the driver names them, from the driver's working
folder: on a cluster, the images (a shared filesystem) and the model must be at the same
paths on every node. ``ray`` is imported here only, when a run starts.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.pipelines.batch import (
    BatchError,
    BatchPlan,
    BatchSummary,
    finish_batch,
    image_record,
    image_records,
    plan_batch,
    prepare_image,
    write_record,
)

MAX_BLOCKS = 10_000   # more blocks cost driver memory and scheduling, for nothing once every actor is busy


class ImageActor:
    """One Ray Data actor: a ``RexOmni`` of its own, one output line per image path."""

    def __init__(self, model_path: str, model_options: Mapping[str, Any], request: dict[str, Any], cwd: str) -> None:
        from rexedge.runtime.api import RexOmni

        if not os.path.isdir(cwd):
            raise BatchError(f"the driver's working folder {cwd} does not exist on node {socket.gethostname()}: "
                             f"the inputs must be at the same paths on every node (a shared filesystem)")
        # the driver's relative paths name the same files here, and error lines read the same
        os.chdir(cwd)
        self.model = RexOmni(model_path, **model_options)
        self.request = request

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        paths = [str(path) for path in batch["path"]]
        if self.model.max_batch == 1:
            records = [image_record(self.model, path, self.request) for path in paths]
        else:   # the batch's images decoded together
            prepared = ((i, (path, prepare_image(self.model, path, self.request))) for i, path in enumerate(paths))
            records = [record for _, record in sorted(image_records(self.model, prepared, self.request),
                                                      key=lambda item: item[0])]
        # JSON text: Arrow would want one schema for the ok and the error lines
        lines = [json.dumps(record) for record in records]
        # the process id: the driver counts actor processes, which shows restarts
        return {"line": lines, "pid": [os.getpid()] * len(lines)}


def local_actor_pids() -> set[int]:
    """The processes of this machine's ``ImageActor``s (Linux), found by the title Ray gives an actor's
    process (``ray::MapWorker(MapBatches(ImageActor))``): to watch their memory, or to kill one in a test."""
    title = f"MapBatches({ImageActor.__name__})".encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:   # gone since the listing
                continue
            if title in cmdline:
                pids.add(int(entry.name))
    return pids


def check_ray_options(actors: int, gpus_per_actor: float, max_batch: int) -> None:
    """Refuses options a run cannot use, before Ray starts."""
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise BatchError(f"actors: expected a whole number >= 1, got {actors!r}")
    if not isinstance(gpus_per_actor, (int, float)) or not gpus_per_actor >= 0:
        raise BatchError(f"gpus_per_actor: expected a number >= 0 (a fraction shares a GPU), got {gpus_per_actor!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise BatchError(f"max_batch: expected a whole number >= 1 (images each actor decodes together), "
                         f"got {max_batch!r}")


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ModuleNotFoundError as e:
        raise RexEdgeError(f"--ray needs {e.name}, which is not installed: pip install 'rexedge[ray]'") from None
    return ray


def run_batch_ray(model_path: str | os.PathLike, inputs: str | os.PathLike | Sequence[str | os.PathLike],
                  out: str | os.PathLike, task: str = "detection", categories: Any = None,
                  keypoint_type: str | None = None, visual_prompt_boxes: Any = None, *,
                  model_options: Mapping[str, Any] | None = None, address: str | None = None, actors: int = 1,
                  gpus_per_actor: float = 0, max_batch: int = 1, coco: str | os.PathLike | None = None,
                  category_ids: Mapping[str, int] | str | os.PathLike | None = None,
                  image_ids: Mapping[str, int] | str | os.PathLike | None = None,
                  progress: bool = True) -> BatchSummary:
    """``run_batch`` on a pool of ``actors`` Ray actors, each loading ``RexOmni(model_path, **model_options)``.

    ``address``: the cluster to join (``"auto"``, ``"ray://host:10001"``, ...); None: the Ray
    instance this process already joined, else a local one started (and stopped) here.
    ``gpus_per_actor``: GPUs Ray reserves for each actor (pass ``device="cuda"`` in
    ``model_options`` too). ``max_batch``: images each actor's model decodes together (each actor's call
    takes that many images; ``RexOmni(max_batch=...)``).
    """
    check_ray_options(actors, gpus_per_actor, max_batch)
    model_options = {**(model_options or {}), **({"max_batch": max_batch} if max_batch > 1 else {})}
    ray = import_ray()
    if address is not None and ray.is_initialized():
        raise BatchError(f"address {address!r}: this process has joined a Ray cluster already; give no address")
    model_path = Path(model_path).resolve()
    if not model_path.exists():
        raise BatchError(f"model: {model_path} does not exist (the model must be at this path on every node)")
    plan = plan_batch(inputs, out, task, categories, keypoint_type, visual_prompt_boxes, coco=coco,
                      category_ids=category_ids, image_ids=image_ids)
    if plan.todo:
        _run_on_ray(ray, plan, str(model_path), model_options, address, actors, gpus_per_actor, max_batch, progress)
    return finish_batch(plan)


def _run_on_ray(ray: Any, plan: BatchPlan, model_path: str, model_options: dict[str, Any], address: str | None,
                actors: int, gpus_per_actor: float, max_batch: int, progress: bool) -> None:
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    todo = plan.todo
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False   # ours counts images, not blocks
        # one image per block (up to MAX_BLOCKS): a task retried after its actor died redoes few images
        paths = ray.data.from_items([{"path": path} for path in todo],
                                    override_num_blocks=min(len(todo), MAX_BLOCKS))
        lines = paths.map_batches(
            ImageActor, fn_constructor_args=(model_path, model_options, plan.request, os.getcwd()),
            batch_size=max_batch,
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=gpus_per_actor or None)
        # no retry options given: Ray Data's actor pools restart a dead actor (max_restarts=-1) and retry
        # its tasks (max_task_retries=-1) by default, and passing them is deprecated (tests/test_ray_batch.py
        # kills an actor mid-run)
        written: set[str] = set()
        processes: set[int] = set()   # a restarted actor is a new process
        with open(plan.out, "a", encoding="utf-8") as sink, \
                tqdm(total=len(todo), unit="img", desc=f"batch on {actors} Ray actors", disable=not progress) as bar:
            for row in lines.iter_rows():
                record = json.loads(row["line"])
                if record["image"] in written:   # an image run twice (a retry): its first line stands
                    continue
                written.add(record["image"])
                processes.add(row["pid"])
                write_record(sink, plan.summary, record)
                bar.update(1)
                bar.set_postfix(failed=plan.summary.failed, actor_processes=len(processes), refresh=False)
    finally:
        if started:
            ray.shutdown()
