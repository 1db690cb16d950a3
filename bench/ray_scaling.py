"""Images/s of ``rexedge batch`` in one process against ``--ray`` with 1 and 2 actors, and each actor's memory.

    python -P -m rexedge.bench.ray_scaling --model cpu-bench --images 24 --repeats 3 --json out.json

One local Ray instance (``--cpus``, default 2) serves every Ray run; each run writes a fresh
output over the same generated images, so the Ray runs pay for starting their actors and
loading their models (the single process has its model loaded before the clock starts).
Per run: wall seconds, images/s over the wall time, the steady rate (images/s between the
first and the last line written: model loads left out), when the first line came, the mean
latency of one image (``inference_time``: the model's work, waits aside); per Ray run the
peak RSS of each actor process, for the single process its own RSS after the run. Repeats go round the
configurations in turn; the printed figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from rexedge.runtime.cli import OPENBLAS_THREAD_TIMEOUT

# as the rexedge command does, before numpy loads OpenBLAS (its idle workers spin otherwise, bench/RESULTS.md);
# a local Ray instance started here passes it on to the actors
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from rexedge.runtime.api import RexOmni  # noqa: E402
from rexedge.runtime.pipelines.batch import run_batch  # noqa: E402
from rexedge.runtime.demo import DEMO_BUNDLE  # noqa: E402
from rexedge.runtime.pipelines.ray_batch import local_actor_pids, run_batch_ray  # noqa: E402

CATEGORIES = ["cup", "dog"]
POLL_S = 0.02
CONFIGS = ("single process", "ray, 1 actor", "ray, 2 actors")


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _Watch:
    """Polls the output's line count (first and last line times) and the actors' RSS while a run goes."""

    def __init__(self, out: Path) -> None:
        self.out, self.first, self.last, self.lines = out, None, None, 0
        self.peak_rss: dict[int, int] = {}
        self._earlier = local_actor_pids()   # a former run's actors may still be shutting down
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._sample()

    def _sample(self) -> None:
        lines = self.out.read_bytes().count(b"\n") if self.out.exists() else 0
        now = time.perf_counter()
        if lines and self.first is None:
            self.first = now
        if lines > self.lines:
            self.lines, self.last = lines, now
        for pid in local_actor_pids() - self._earlier:
            rss = _rss_bytes(pid)
            if rss is not None:
                self.peak_rss[pid] = max(rss, self.peak_rss.get(pid, 0))


def _timed(run: Callable[[Path], Any], out: Path, images: int) -> dict[str, Any]:
    start = time.perf_counter()
    with _Watch(out) as watch:
        summary = run(out)
    wall = time.perf_counter() - start
    assert summary.done == images and watch.lines == images, (summary, watch.lines)
    steady = (images - 1) / (watch.last - watch.first) if watch.last > watch.first else None
    return {"wall_s": wall, "images_per_s": images / wall, "steady_images_per_s": steady,
            "first_line_s": watch.first - start, "mean_latency_s": summary.mean_latency_s,
            "actor_peak_rss_mb": sorted(round(v / 2**20) for v in watch.peak_rss.values())}


def _model(name: str, workdir: Path) -> Path:
    if name == "demo":
        return DEMO_BUNDLE
    from rexedge.bench.harness import resolve_model

    return resolve_model(name, ["ort"], None, "fp32", workdir, "cpu", print).bundles["float"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cpu-bench", help="demo (the embedded bundle), a preset, or a bundle")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=336, help="side of the generated square images (pixels)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="what to run (default: all)")
    parser.add_argument("--json", metavar="OUT", help="write every run's figures here")
    args = parser.parse_args(argv)

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = _model(args.model, work)
        rng = np.random.default_rng(0)
        (work / "images").mkdir()
        for i in range(args.images):
            pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(work / "images" / f"{i:06d}.png")
        options = {"max_tokens": args.max_tokens, "constrain_phrases": True}
        model = RexOmni(bundle, **options)
        single_rss = {}

        def single(out: Path) -> Any:
            summary = run_batch(model, work / "images", out, categories=CATEGORIES, progress=False)
            single_rss["mb"] = round(_rss_bytes(os.getpid()) / 2**20)
            return summary

        def on_ray(actors: int) -> Callable[[Path], Any]:
            return lambda out: run_batch_ray(bundle, work / "images", out, categories=CATEGORIES,
                                             model_options=options, actors=actors, progress=False)

        configs = {name: run for name, run in zip(CONFIGS, (single, on_ray(1), on_ray(2))) if name in args.configs}
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        try:
            for repeat in range(args.repeats):
                for index, (name, run) in enumerate(configs.items()):
                    runs[name].append(_timed(run, work / f"out-{repeat}-{index}.jsonl", args.images))
                    print(f"repeat {repeat + 1}, {name}: {runs[name][-1]}", flush=True)
        finally:
            ray.shutdown()
    if single_rss:
        runs["single process"][-1]["process_rss_mb"] = single_rss["mb"]
    summary = {name: {key: statistics.median(r[key] for r in rs)
                      for key in ("wall_s", "images_per_s", "steady_images_per_s", "first_line_s", "mean_latency_s")}
               for name, rs in runs.items()}
    for name, figures in summary.items():
        print(f"{name}: median wall {figures['wall_s']:.1f} s, {figures['images_per_s']:.2f} images/s, "
              f"steady {figures['steady_images_per_s']:.2f} images/s, "
              f"first line after {figures['first_line_s']:.1f} s, "
              f"mean latency {figures['mean_latency_s'] * 1e3:.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "medians": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
