"""``rexedge bench``: every backend and the baseline on the same model, scenarios and inputs.

    rexedge bench --model cpu-bench --backend ort torch --baseline transformers \\
        --scenario det-448 --repeats 3 --json out.json --plot out.png

``--model`` is a preset name (a random checkpoint of that preset is written to a temporary
directory, and exported to a bundle when ``ort`` runs), a checkpoint directory (exported
on the fly for ``ort``), or a bundle directory (``ort`` only). All runners are loaded
first; then for each scenario every runner is warmed up and the timed repeats go round
the runners in turn, so a change in machine load touches them alike and the ratios
(``speedup_vs_baseline``) come from one run. The JSON schema is in bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rexedge.bench.metrics import PeakRss, cpu_name, host_read_bandwidth, nominal_bandwidth, summary
from rexedge.bench.runners import STAGES, RexedgeRunner, Run
from rexedge.bench.scenarios import (
    DEFAULT_SCENARIOS,
    BenchError,
    Scenario,
    forced_response,
    parse_scenario,
    synthetic_image,
)
from rexedge.bench.scripted import STEP_KINDS
from rexedge.runtime.config import PRESETS, RexOmniConfig
from rexedge.runtime.manifest import MANIFEST

SCHEMA = "rexedge-bench/1"
BASELINES = ("transformers",)
CONTEXT_MARGIN = 8  # KV slots beyond the longest scenario
THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class ModelSource:
    label: str
    config: RexOmniConfig
    checkpoint: Path | None
    bundle: Path | None


def resolve_model(model: str, backends: Sequence[str], baseline: str | None, precision: str, workdir: Path,
                  device: str, log: Callable[[str], None]) -> ModelSource:
    """A preset name, a checkpoint or a bundle; writes/exports what the runners need into ``workdir``."""
    path = Path(model)
    needs_checkpoint = [b for b in backends if b != "ort"] + ([baseline] if baseline else [])
    if model in PRESETS and not path.exists():
        from rexedge.export.fixtures.tiny import write_tiny_checkpoint

        dtype = "bfloat16" if model == "rex-omni-3b" and device.startswith("cuda") else "float32"
        log(f"bench: writing a random {model} checkpoint ({dtype}) to {workdir}")
        checkpoint = write_tiny_checkpoint(workdir / "checkpoint", preset=model, dtype=dtype)
        config, bundle = RexOmniConfig.from_json(checkpoint), None
    elif (path / MANIFEST).is_file():
        if needs_checkpoint:
            raise BenchError(f"--model {model} is a bundle: {', '.join(needs_checkpoint)} need(s) a checkpoint "
                             f"directory (or a preset name)")
        from rexedge.runtime.bundle import load_bundle

        return ModelSource(str(path), load_bundle(path).config, None, path)
    elif (path / "config.json").is_file():
        checkpoint, config, bundle = path, RexOmniConfig.from_json(path), None
    else:
        raise BenchError(f"--model {model}: not a preset ({', '.join(sorted(PRESETS))}), a checkpoint directory "
                         f"(config.json) or a bundle directory (manifest.json)")
    if "ort" in backends:
        from rexedge.export.bundle import export_bundle

        log(f"bench: exporting {checkpoint} to an {precision} bundle")
        bundle = export_bundle(checkpoint, workdir / "bundle", precision=precision, progress=False)
    return ModelSource(model, config, checkpoint, bundle)


def _make_runner(name: str, source: ModelSource, device: str, max_context: int, precision: str,
                 threads: int | None) -> Any:
    if name == "transformers":
        from rexedge.bench.baseline_transformers import TransformersRunner

        return TransformersRunner(source.checkpoint, device, precision)
    if name == "ort":
        return RexedgeRunner("ort", source.bundle, device, max_context, {"threads": threads} if threads else {})
    return RexedgeRunner(name, source.checkpoint, device, max_context)


def _max_context(source: ModelSource, scenarios: Sequence[Scenario]) -> int:
    """KV capacity for the longest scenario: its prompt (image tokens included) and its answer."""
    from rexedge.runtime.request.encode import encode_task
    from rexedge.runtime.request.preprocess import preprocess
    from rexedge.runtime.request.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(source.checkpoint or source.bundle)
    cfg, longest = source.config, 0
    for s in scenarios:
        image = preprocess(synthetic_image(s.image_size), cfg=cfg)   # the request as the runners build it
        prompt = encode_task(tokenizer, image, s.task, s.categories).prompt_ids
        longest = max(longest, len(prompt) + len(forced_response(s, tokenizer)))
    if longest + CONTEXT_MARGIN > cfg.max_position_embeddings:
        raise BenchError(f"the longest scenario needs {longest} tokens, the model holds {cfg.max_position_embeddings}")
    return longest + CONTEXT_MARGIN


def run_bench(model: str, backends: Sequence[str], scenarios: Sequence[Scenario], baseline: str | None = None,
              repeats: int = 3, warmup: int = 1, device: str = "cpu", precision: str = "fp32",
              threads: int | None = None, workdir: Path | None = None, command: str | None = None,
              log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> dict[str, Any]:
    """Run every runner on every scenario; return the JSON document (bench/README.md)."""
    if repeats < 1 or warmup < 0:
        raise BenchError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if not backends:
        raise BenchError("no backend to benchmark")
    if baseline is not None and baseline not in BASELINES:
        raise BenchError(f"baseline {baseline!r}: expected one of {BASELINES}")
    if not PeakRss.available():
        raise BenchError("peak RSS needs Linux's /proc/self/clear_refs and /proc/self/status")
    scratch = Path(tempfile.mkdtemp(prefix="rexedge-bench-")) if workdir is None else Path(workdir)
    try:
        source = resolve_model(model, backends, baseline, precision, scratch, device, log)
        max_context = _max_context(source, scenarios)
        bandwidth = _bandwidth(device)
        load_start, started = os.getloadavg()[0], datetime.datetime.now().astimezone()
        base_rss = PeakRss.current()
        runners, load_rss, load_s = {}, {}, {}
        for name in [*backends, *([baseline] if baseline else [])]:
            gc.collect()
            before = PeakRss.current()
            log(f"bench: loading {name}")
            start = time.perf_counter()
            runners[name] = _make_runner(name, source, device, max_context, precision, threads)
            load_s[name] = round(time.perf_counter() - start, 3)
            load_rss[name] = PeakRss.current() - before
            log(f"bench: loaded {name} in {load_s[name]:.1f} s")
        memory = {name: Memory(base_rss, load) for name, load in load_rss.items()}
        measured = []
        for scenario in scenarios:
            runs = _measure(runners, memory, scenario, warmup, repeats, log)
            measured.append((scenario, runs, {name: m.snapshot(runs[name]) for name, m in memory.items()}))
            bandwidth = _bandwidth(device, bandwidth)
        records = [_record(name, name == baseline, scenario, runs[name], runner, snapshots[name], bandwidth)
                   for scenario, runs, snapshots in measured for name, runner in runners.items()]
        for record in records:
            record["load_s"] = load_s[record["backend"]]
        _add_speedups(records, baseline)
        return {
            "schema": SCHEMA,
            "date": started.isoformat(timespec="seconds"),
            "command": command,
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "device": device,
                        **bandwidth,
                        # a shared machine's load changes timings; thread settings change the host head's cost
                        "load_average_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                        "thread_env": {k: os.environ.get(k) for k in THREAD_ENV}},
            "model": {"name": source.label, "preset": model if model in PRESETS else None, "parameters": _parameters(source.config),
                      "hidden_size": source.config.hidden_size, "layers": source.config.num_hidden_layers,
                      "vocab_size": source.config.vocab_size, "precision": precision},
            "settings": {"backends": list(backends), "baseline": baseline, "repeats": repeats, "warmup": warmup,
                         "threads": threads, "max_context": max_context,
                         "scenarios": [dict(name=s.name, image_size=list(s.image_size), num_boxes=s.num_boxes,
                                            num_categories=s.num_categories, task=s.task, decoding=s.decoding)
                                       for s in scenarios]},
            "records": records,
        }
    finally:
        if workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)


class Memory:
    """One runner's resident memory, as if it were alone in the process: the base (imports, before
    any runner), what loading it added, what its runs left resident (lazily mapped weights,
    caches) and the largest rise within one run."""

    def __init__(self, base: int, load: int) -> None:
        self.base, self.load, self.retained, self.peak_extra = base, load, 0, 0

    def run(self, runner: Any, scenario: Scenario, image: Any) -> Run:
        start = PeakRss.current()
        PeakRss.reset()
        run = runner.run(scenario, image)
        # other runners' memory is freed or kept by them, never by this run: rises only
        self.peak_extra = max(self.peak_extra, self.retained + PeakRss.peak() - start)
        self.retained += max(0, PeakRss.current() - start)
        return run

    def snapshot(self, runs: list[Run]) -> dict[str, int | None]:
        return {"base_rss_bytes": self.base, "load_rss_bytes": self.load, "retained_rss_bytes": self.retained,
                "peak_rss_bytes": self.base + self.load + self.peak_extra,
                "peak_gpu_bytes": max((r.peak_gpu_bytes or 0 for r in runs), default=0) or None}


def _measure(runners: dict[str, Any], memory: dict[str, Memory], scenario: Scenario, warmup: int, repeats: int,
             log: Callable[[str], None]) -> dict[str, list[Run]]:
    """Warm-up and timed rounds, each round going over every runner; the timed runs."""
    image = synthetic_image(scenario.image_size)
    runs: dict[str, list[Run]] = {name: [] for name in runners}
    for round_ in range(warmup + repeats):
        for name, runner in runners.items():
            run = memory[name].run(runner, scenario, image)
            if round_ >= warmup:
                runs[name].append(run)
        log(f"bench: {scenario.name}: round {round_ + 1}/{warmup + repeats}{' (warm-up)' if round_ < warmup else ''}")
    return runs


def _bandwidth(device: str, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The device's memory bandwidth. On the CPU it is measured before the runs and after each
    scenario; the best sample counts (on a shared machine the others are depressed by load)."""
    if device.startswith("cuda"):
        if previous is not None:
            return previous
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
        gbs = nominal_bandwidth(name)
        return {"device_name": name, "bandwidth_gbs": gbs, "bandwidth_source": "nominal" if gbs else None,
                "bandwidth_samples_gbs": []}
    samples = (previous or {}).get("bandwidth_samples_gbs", []) + [round(host_read_bandwidth(), 2)]
    return {"device_name": cpu_name(), "bandwidth_gbs": max(samples), "bandwidth_samples_gbs": samples,
            "bandwidth_source": "measured: numpy sums of a 512 MiB float32 buffer, a slice per core, best sample"}


def _parameters(cfg: RexOmniConfig) -> int | None:
    try:
        import math

        from rexedge.runtime.model.checkpoint import expected_tensor_shapes
    except ImportError:  # a bundle benchmarked without torch installed
        return None
    return sum(math.prod(s) for s in expected_tensor_shapes(cfg).values())


def _ms(values: Sequence[float]) -> dict[str, float | int]:
    return {k: (round(v * 1e3, 4) if k != "n" else v) for k, v in summary(values).items()}


def _record(name: str, is_baseline: bool, scenario: Scenario, runs: list[Run], runner: Any,
            memory: dict[str, Any], bandwidth: dict[str, Any]) -> dict[str, Any]:
    first = runs[0]
    tokens = first.output_tokens
    metrics: dict[str, Any] = {}
    for stage in STAGES:
        values = [r.stages[stage] for r in runs]
        metrics[stage.replace("_s", "_ms")] = None if None in values else _ms(values)
    metrics["decode_ms_per_token"] = _ms([r.stages["decode_s"] / tokens for r in runs])
    host = [r.stages["host_s"] for r in runs]
    metrics["host_ms_per_token"] = None if None in host else _ms([h / tokens for h in host])
    metrics["tokens_per_s"] = _rate([tokens / r.stages["decode_s"] for r in runs])
    metrics["boxes_per_s"] = _rate([r.boxes / r.stages["end_to_end_s"] for r in runs])
    return {
        "backend": name,
        "baseline": is_baseline,
        "scenario": scenario.name,
        "task": scenario.task,
        "decoding": "generate" if name == "transformers" else scenario.decoding,
        "image_size": list(scenario.image_size),
        "prompt_tokens": first.prompt_tokens,
        "output_tokens": tokens,
        "boxes": first.boxes,
        "repeats": len(runs),
        "metrics": metrics,
        "steps": _steps(runs, runner, bandwidth["bandwidth_gbs"]),
        "memory": memory,
        "speedup_vs_baseline": None,
    }


def _rate(values: Sequence[float]) -> dict[str, float | int]:
    return {k: (round(v, 3) if k != "n" else v) for k, v in summary(values).items()}


def _head_rows(kind: str, cfg: RexOmniConfig) -> int:
    """Head rows a choice of this kind multiplies (a choice step: the two or so ids the grammar offers)."""
    return {"free": cfg.vocab_size, "full": cfg.vocab_size, "coord": 1000, "choice": 2, "forced": 0}[kind]


def _steps(runs: list[Run], runner: Any, bandwidth_gbs: float | None) -> dict[str, Any]:
    """Per step kind (the kind of the choice that opens a step; its forced tokens ride along): counts,
    tokens, ms per step (head + backend), ms per token, bytes read, the floor, % of bandwidth."""
    out = {}
    kinds = [k for k in (*STEP_KINDS, "full") if any(s.kind == k for s in runs[0].steps)]
    for kind in kinds:
        steps = [s for r in runs for s in r.steps if s.kind == kind]
        total_s = [s.head_s + s.backend_s for s in steps]
        context = sum(s.context for s in steps) / len(steps)
        read = runner.byte_model.step_bytes(context, _head_rows(kind, runner.byte_model.cfg))
        median_ms = summary(total_s)["median"] * 1e3
        floor_ms = read / (bandwidth_gbs * 1e9) * 1e3 if bandwidth_gbs else None
        out[kind] = {
            "steps": sum(1 for s in runs[0].steps if s.kind == kind),
            "tokens": sum(s.tokens for s in runs[0].steps if s.kind == kind),
            "forced_tokens": sum(s.forced for s in runs[0].steps if s.kind == kind),
            "ms_per_step": _ms(total_s),
            "head_ms_per_step": _ms([s.head_s for s in steps]),
            "backend_ms_per_step": _ms([s.backend_s for s in steps]),
            "ms_per_token": _ms([(s.head_s + s.backend_s) / s.tokens for s in steps]),
            "bytes_per_step": int(read),
            "floor_ms_per_step": None if floor_ms is None else round(floor_ms, 4),
            "bandwidth_pct": None if floor_ms is None else round(100 * floor_ms / median_ms, 1),
        }
    return out


def _add_speedups(records: list[dict[str, Any]], baseline: str | None) -> None:
    """Baseline median / this record's median, per scenario, for end-to-end, TTFT and per-token decode."""
    if baseline is None:
        return
    base = {r["scenario"]: r["metrics"] for r in records if r["baseline"]}
    for r in records:
        if r["baseline"]:
            continue
        b, m = base[r["scenario"]], r["metrics"]
        r["speedup_vs_baseline"] = {
            key: round(b[metric]["median"] / m[metric]["median"], 3)
            for key, metric in (("end_to_end", "end_to_end_ms"), ("ttft", "ttft_ms"),
                                ("decode_per_token", "decode_ms_per_token"))}


def bench_command(args: argparse.Namespace) -> None:
    import json

    from rexedge.bench.report import plot, table

    """``rexedge bench`` (options declared in rexedge.runtime.cli)."""
    scenarios = [parse_scenario(s) for s in (args.scenario or DEFAULT_SCENARIOS)]
    result = run_bench(args.model, args.backend, scenarios, baseline=args.baseline, repeats=args.repeats,
                       warmup=args.warmup, device=args.device, precision=args.precision, threads=args.threads,
                       command=" ".join(["rexedge", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
