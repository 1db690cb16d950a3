"""Where one decode step of a bundle's decoder (and its head graph) spends its time: ONNX Runtime's profiler.

Makes the decoder and head sessions with rexedge's session options plus ``enable_profiling``, prefills
``--prompt`` random embeddings, runs ``--steps`` single-token steps (the first two untimed), each
followed by the head graph's full-vocabulary product where the bundle has one, and reads the profiles:
per step, the kernel time by group (MatMulNBits of each projection, GroupQueryAttention, the rest by
operator type), ONNX Runtime's own time around the kernels (a run's ``model_run`` minus its kernels)
and the host's (the step's wall time minus ``model_run``). Medians over the timed steps, in ms:

    python -P -m rexedge.bench.step_profile BUNDLE [--threads 2] [--steps 12] [--prompt 300] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.graph_session import CPU, HeadSession, InPlaceSession, session_options
from rexedge.runtime.bundle import Bundle, load_bundle
from rexedge.runtime.request.positions import decode_positions

_PROJECTION = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.")


def _node_groups(path: Path) -> dict[str, str]:
    """Node name -> group: ``MatMulNBits q_proj`` etc. for the projections, else the operator type."""
    groups = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        found = _PROJECTION.search(node.input[1]) if node.op_type == "MatMulNBits" and len(node.input) > 1 else None
        groups[node.name] = f"{node.op_type} {found.group(1)}_proj" if found else node.op_type
    return groups


def _runs(profile: str, groups: dict[str, str]) -> list[dict[str, float]]:
    """Per ``model_run`` of a profile, in order: ms per group, and ``model_run`` itself."""
    with open(profile, encoding="utf-8") as fh:
        events = json.load(fh)
    runs = [{"start": e["ts"], "end": e["ts"] + e["dur"], "model_run": e["dur"] / 1e3, "kernels": defaultdict(float)}
            for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        run = next((r for r in runs if r["start"] <= e["ts"] <= r["end"]), None)
        if run is not None:
            run["kernels"][groups.get(node, e.get("args", {}).get("op_name", node))] += e["dur"] / 1e3
    return [{**r["kernels"], "model_run": r["model_run"]} for r in runs]


def _session(path: Path, threads: int | None, prefix: str) -> ort.InferenceSession:
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    return ort.InferenceSession(str(path), options, providers=CPU)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    scratch = Path(tempfile.mkdtemp(prefix="rexedge-profile-"))
    try:
        report = _profile(bundle, args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def _profile(bundle: Bundle, args: argparse.Namespace, scratch: Path) -> dict:
    cfg = bundle.config
    decoder_path = bundle.path(bundle.decoder.file)
    decoder = _session(decoder_path, args.threads, str(scratch / "decoder"))
    head = None
    if bundle.head_graph is not None:
        head_path = bundle.path(bundle.head_graph[schema.FILE])
        head = HeadSession(_session(head_path, args.threads, str(scratch / "head")), cfg.hidden_size, cfg.vocab_size)
    cache = InPlaceSession(decoder, cfg, args.prompt + args.steps + 1)
    rng = np.random.default_rng(0)
    hidden = cache.append(rng.standard_normal((args.prompt, cfg.hidden_size)).astype(np.float32) * 0.02,
                          np.tile(np.arange(args.prompt), (3, 1)))
    step_s, head_s = [], []
    for _ in range(args.steps):
        embeds = rng.standard_normal((1, cfg.hidden_size)).astype(np.float32) * 0.02
        start = time.perf_counter()
        hidden = cache.append(embeds, decode_positions(cache.length, 0))
        step_s.append(time.perf_counter() - start)
        if head is not None:
            start = time.perf_counter()
            head.logits(hidden)
            head_s.append(time.perf_counter() - start)
    runs = _runs(decoder.end_profiling(), _node_groups(decoder_path))[1:]   # the first run is the prefill
    timed = slice(2, None)
    step_ms = [s * 1e3 for s in step_s[timed]]
    kernels = defaultdict(list)
    for run in runs[timed]:
        for group in {g for r in runs for g in r}:
            kernels[group].append(run.get(group, 0.0))
    median = {g: round(statistics.median(v), 3) for g, v in kernels.items()}
    run_ms = median.pop("model_run")
    report = {"bundle": str(bundle.directory), "threads": args.threads, "prompt": args.prompt,
              "step_ms": round(statistics.median(step_ms), 3), "model_run_ms": run_ms,
              "kernels_ms": round(sum(median.values()), 3),
              "host_ms": round(statistics.median(s - r["model_run"] for s, r in zip(step_ms, runs[timed])), 3),
              "by_group_ms": dict(sorted(median.items(), key=lambda kv: -kv[1]))}
    if head is not None:
        head_runs = _runs(head.session.end_profiling(), _node_groups(head_path))[timed]
        report["head_ms"] = round(statistics.median(s * 1e3 for s in head_s[timed]), 3)
        report["head_model_run_ms"] = round(statistics.median(r["model_run"] for r in head_runs), 3)
    return report


if __name__ == "__main__":
    main()
