"""Batched decoding: images/s and the decode step at ``max_batch`` N against one image at a time.

    python -P -m rexedge.bench.batched --model cpu-bench --scenario det-448 --images 8 --max-batch 1 4 \\
        --repeats 3 --json batched.json

Each image of a round is the scenario's image with fresh random pixels, and every sequence is forced to
the scenario's answer through the real decode loop (``rexedge.bench.scripted.ScriptedHead``, one per
slot: the real head runs on the real hidden state, the script picks the token), so every setting decodes
the same tokens. A round is ``RexOmni.inference`` of all the images (the public API: preprocessing,
vision, prefill, decoding, parsing; with ``max_batch`` > 1 the images decode together). Rounds go
round the settings in turn (a change in machine load touches all alike); figures are medians.

With ``--categories-scenario`` (e.g. ``448x448:24/6``) it also decodes one image's K categories as the
joint prompt (batch 1) and as parallel categories (K branches sharing the image's prefill,
``max_batch`` K), both forced to the same boxes, and reports prefill, decode and end-to-end times.

``--backend torch --device cuda`` runs the same rounds on the torch CUDA backend (captured graphs per batch
bucket; bf16 unless ``--dtype``), e.g. the GPU table at batch 1, 4 and 16::

    python -P -m rexedge.bench.batched --model cpu-bench --backend torch --device cuda --images 16 \
        --max-batch 1 4 16 --json batched-cuda.json

``--pad-vs-group`` also times, on the torch CPU backend, one step of 4 rows whose jump-forward runs differ
(1, 3, 1, 1 tokens) padded into one call against grouped into two (``ort`` cannot pad: its attention
operator takes several rows one token at a time, so it groups).

Reported per setting: images/s over a round; the backend's single-token step (one token per live row;
``step_batch`` at ``max_batch`` > 1 with all rows live, ``step`` at 1) and a loop step (a round's decode
time per backend call, head and grammar included); and the floors of a single-token step: weights +
KV cache read once for all rows over the measured bandwidth, and 2 FLOPs per weight per row over the
measured float32 matrix-multiply rate (a CPU turns compute-bound when the second exceeds the first).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rexedge.bench.harness import _bandwidth, _max_context, resolve_model
from rexedge.bench.metrics import decoder_weight_count, summary
from rexedge.bench.scenarios import BenchError, forced_response, parse_scenario
from rexedge.bench.scripted import ScriptedHead
from rexedge.runtime.decode.head import Sampling
from rexedge.runtime.decode.loop import DecodeLoop, Limits


class StepTimer:
    """Forwards to the backend; times every single-token step and counts the rows it carried."""

    def __init__(self, backend: Any, synchronize: Any = None) -> None:
        self._backend = backend
        self._synchronize = synchronize   # a GPU backend returns before its step has run: wait for it
        self.steps: list[tuple[int, float]] = []   # (live rows, seconds) of single-token steps
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        return self._timed(1, len(token_ids), self._backend.step, token_ids, position_ids)

    def step_batch(self, token_ids: np.ndarray, position_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return self._timed(int((counts > 0).sum()), token_ids.shape[1], self._backend.step_batch, token_ids,
                           position_ids, counts)

    def _timed(self, rows: int, width: int, call: Any, *args: Any) -> np.ndarray:
        self.calls += 1
        start = time.perf_counter()
        hidden = call(*args)
        if self._synchronize is not None:
            self._synchronize()
        if width == 1:
            self.steps.append((rows, time.perf_counter() - start))
        return hidden


def matmul_gflops(device: str = "cpu", dtype: str = "float32", size: int = 1536, repeats: int = 5) -> float:
    """The best matrix-multiply rate reached here, GFLOP/s: numpy float32 on the CPU (all threads), torch in
    ``dtype`` on a CUDA device."""
    if device.startswith("cuda"):
        import torch

        a = torch.randn(4 * size, 4 * size, device=device, dtype=getattr(torch, dtype))
        best = float("inf")
        for _ in range(repeats + 1):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.mm(a, a)
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        return 2 * (4 * size) ** 3 / best / 1e9
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.dot(a, a, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


class Setting:
    """One ``max_batch``: a RexOmni over the bundle (or checkpoint) with a scripted head per slot and a timed
    backend; ``options``: the backend's (backend, device, threads, dtype)."""

    def __init__(self, model: Path, max_batch: int, max_context: int, script: list[int], decoding: str,
                 options: dict[str, Any]) -> None:
        from rexedge.runtime.api import RexOmni

        self.max_batch = max_batch
        self.model = RexOmni(model, max_context=max_context, max_batch=max_batch, **options)
        self.torch = None
        if options.get("device", "cpu").startswith("cuda"):
            import torch

            self.torch = torch
        self.timer = StepTimer(self.model.backend, None if self.torch is None else self.torch.cuda.synchronize)
        heads = [ScriptedHead(self.model.backend.make_head(Sampling()), script) for _ in range(max_batch)]
        self.model.loop = DecodeLoop(self.timer, heads[0], self.model.ids, mode=decoding,
                                     limits=Limits(max_new_tokens=len(script)), heads=heads)
        self.script = script
        self.rounds: list[dict[str, float]] = []

    def run(self, images: list[np.ndarray], categories: list[str], task: str) -> None:
        self.timer.steps, self.timer.calls = [], 0
        start = time.perf_counter()
        results = self.model.inference(images, task=task, categories=categories)
        wall = time.perf_counter() - start
        for r in results:
            if r["output_token_ids"] != self.script or r["stop_reason"] != "eos":
                raise BenchError(f"max_batch {self.max_batch}: an image did not decode its forced answer "
                                 f"(stop {r['stop_reason']})")
        full = [s for rows, s in self.timer.steps if rows == min(self.max_batch, len(images))]
        # decode time of the round: the images' decode stages overlap when batched, so take the span
        decode_s = sum(r["timings"]["decode_s"] for r in results) if self.max_batch == 1 else \
            max(r["timings"]["decode_s"] for r in results)
        self.rounds.append({"images_per_s": len(images) / wall, "wall_s": wall,
                            "step_ms": float(np.median(full)) * 1e3 if full else float("nan"),
                            "loop_step_ms": decode_s / max(self.timer.calls, 1) * 1e3,
                            "backend_calls": self.timer.calls,
                            # on a GPU: what the KV slots and the graphs captured per (bucket, width) hold
                            **({} if self.torch is None else
                               {"gpu_reserved_gib": self.torch.cuda.memory_reserved() / 2**30})})


def run(args: argparse.Namespace) -> dict[str, Any]:
    scenario = parse_scenario(args.scenario)
    if args.backend != "ort" and (args.categories_scenario or args.threads):
        raise BenchError("--categories-scenario and --threads run the ort backend; leave them out with --backend "
                         f"{args.backend}")
    on_gpu = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    with tempfile.TemporaryDirectory(prefix="rexedge-batched-") as tmp:
        source = resolve_model(args.model, [args.backend], None, "fp32", Path(tmp), args.device,
                               lambda m: print(m, file=sys.stderr))
        max_context = _max_context(source, [scenario])
        from rexedge.runtime.request.tokenizer import Tokenizer

        bundle = source.bundles.get("float")
        model = bundle if args.backend == "ort" else source.checkpoint
        script = forced_response(scenario, Tokenizer.from_dir(model))
        options: dict[str, Any] = {"backend": args.backend, "device": args.device}
        options.update({"threads": args.threads} if args.threads else {})
        options.update({"dtype": dtype} if args.backend == "torch" else {})
        settings = [Setting(model, b, max_context, script, scenario.decoding, options) for b in args.max_batch]
        rng = np.random.default_rng(0)
        width, height = scenario.image_size
        load = [os.getloadavg()[0]]
        bandwidth = _bandwidth(args.device)
        gflops = matmul_gflops(args.device, dtype)
        for round_ in range(args.warmup + args.repeats):
            images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(args.images)]
            for setting in settings:
                setting.run(images, scenario.categories, scenario.task)
                if round_ < args.warmup:
                    setting.rounds.clear()
            print(f"batched: round {round_ + 1}/{args.warmup + args.repeats}", file=sys.stderr)
        padding = (pad_vs_group(source.checkpoint) if args.pad_vs_group and source.checkpoint is not None
                   else None)
        categories = (parallel_categories(bundle, args.categories_scenario, args.repeats, args.warmup,
                                          args.threads) if args.categories_scenario else None)
        load.append(os.getloadavg()[0])
        bandwidth = _bandwidth(args.device, bandwidth)
        cfg = source.config
        weights = decoder_weight_count(cfg)
        prompt = len(settings[0].model.prepare(images[0], scenario.task, scenario.categories).prompt_ids)
        element = 2 if dtype in ("bfloat16", "float16") and args.backend == "torch" else 4   # ort bundles: fp32
        kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * element
        records = []
        base = None
        for setting in settings:
            rows = min(setting.max_batch, args.images)
            med = {k: summary([r[k] for r in setting.rounds])["median"] for k in setting.rounds[0]}
            # a single-token step at mid-answer: weights once, each row's cache (prompt + half the answer)
            bytes_ = weights * element + rows * kv_per_token * (prompt + len(script) / 2)
            floors = {"bandwidth_floor_ms": bytes_ / ((bandwidth["bandwidth_gbs"] or float("nan")) * 1e9) * 1e3,
                      "compute_floor_ms": 2 * weights * rows / (gflops * 1e9) * 1e3}
            record = {"max_batch": setting.max_batch, "rows_per_step": rows, **med, **floors}
            if base is None:
                base = record
            record["images_per_s_vs_1"] = record["images_per_s"] / base["images_per_s"]
            record["step_vs_1"] = record["step_ms"] / base["step_ms"]
            records.append(record)
    return {"schema": "rexedge-bench-batched/1",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "python -P -m rexedge.bench.batched " + shlex.join(sys.argv[1:]),
            "backend": args.backend, "device": args.device, "dtype": dtype if args.backend == "torch" else "fp32",
            "machine": {"cpu": bandwidth["device_name"], "cores": os.cpu_count(),
                        "bandwidth_gbs": bandwidth["bandwidth_gbs"], "matmul_gflops": round(gflops, 1),
                        "load_average_1min": load},
            "model": args.model, "scenario": scenario.name, "images": args.images, "answer_tokens": len(script),
            "prompt_tokens": prompt, "repeats": args.repeats, "records": records, "parallel_categories": categories,
            "torch_pad_vs_group": padding}


def branch_scripts(script: list[int], ids: Any) -> list[list[int]]:
    """The joint answer's groups, one per category, each ended by <|im_end|>: what each branch answers (merged
    back in order they are the joint answer)."""
    starts = [i for i, t in enumerate(script) if t == ids.object_ref_start]
    ends = [i - 2 for i in starts[1:]] + [len(script) - 1]   # before ", " and before the final <|im_end|>
    return [script[a:b] + [ids.im_end] for a, b in zip(starts, ends)]


def parallel_categories(bundle: Path, scenario_text: str, repeats: int, warmup: int, threads: int | None
                        ) -> dict[str, Any]:
    """The scenario's image and categories asked jointly (one prompt, batch 1) and as parallel categories (one
    branch per category sharing the image's prefill), both forced to the same boxes: medians in seconds."""
    from rexedge.runtime.api import RexOmni
    from rexedge.runtime.request.tokenizer import Tokenizer

    scenario = parse_scenario(scenario_text)
    script = forced_response(scenario, Tokenizer.from_dir(bundle))
    options = {"threads": threads} if threads else {}
    joint = RexOmni(bundle, max_context=2048, **options)
    joint.loop = DecodeLoop(joint.backend, ScriptedHead(joint.backend.make_head(Sampling()), script), joint.ids,
                            mode=scenario.decoding, limits=Limits(max_new_tokens=len(script)))
    k = scenario.num_categories
    parallel = RexOmni(bundle, max_context=2048, max_batch=k, parallel_categories=True, **options)
    heads = [ScriptedHead(parallel.backend.make_head(Sampling()), branch)
             for branch in branch_scripts(script, parallel.ids)]
    parallel.loop = DecodeLoop(parallel.backend, heads[0], parallel.ids, mode=scenario.decoding,
                               limits=Limits(max_new_tokens=len(script)), heads=heads)
    rng = np.random.default_rng(1)
    width, height = scenario.image_size
    runs: dict[str, list[dict[str, float]]] = {"joint": [], "parallel": []}
    for round_ in range(warmup + repeats):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for name, model in (("joint", joint), ("parallel", parallel)):
            [r] = model.inference(image, task=scenario.task, categories=scenario.categories)
            if r["output_token_ids"] != script:
                raise BenchError(f"parallel categories: the {name} run did not decode the forced answer")
            t = r["timings"]
            if round_ >= warmup:
                runs[name].append({"prefill_s": t["prefill_s"], "decode_s": t["decode_s"],
                                   "end_to_end_s": r["inference_time"], "prompt_tokens": r["num_prompt_tokens"]})
    med = {name: {k: summary([r[k] for r in rs])["median"] for k in rs[0]} for name, rs in runs.items()}
    return {"scenario": scenario.name, "categories": k, "answer_tokens": len(script), **med,
            "decode_vs_joint": med["parallel"]["decode_s"] / med["joint"]["decode_s"],
            "end_to_end_vs_joint": med["parallel"]["end_to_end_s"] / med["joint"]["end_to_end_s"]}


def pad_vs_group(checkpoint: Path, repeats: int = 10, context: int = 300) -> dict[str, float]:
    """torch CPU: one step of 4 rows whose runs are 1, 3, 1, 1 tokens, padded into one call, against grouped
    (a call of one token per row, then the 3-token run as a batch-1 call); medians in ms, interleaved."""
    from rexedge.runtime.backends import load_backend

    backend = load_backend("torch", checkpoint, max_context=context + 16, max_batch=4)
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((context, backend.config.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, 1000, (4, 3))
    positions = np.tile(np.arange(context, context + 3), (3, 4, 1))
    times: dict[str, list[float]] = {"padded_ms": [], "grouped_ms": []}
    for _ in range(repeats + 2):
        for name in times:
            for slot in range(4):   # the same cache before every step
                backend.prefill(prompt, np.tile(np.arange(context), (3, 1)), slot=slot)
            start = time.perf_counter()
            if name == "padded_ms":
                backend.step_batch(tokens, positions, np.array([1, 3, 1, 1]))
            else:
                backend.step_batch(tokens[:, :1], positions[:, :, :1], np.array([1, 0, 1, 1]))
                backend.step(tokens[1], positions[:, 1], slot=1)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: float(np.median(values[2:])) for name, values in times.items()}


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['model']}, {report['scenario']}, {report['images']} images, {report['answer_tokens']}-token "
             f"answers; {report['backend']} on {report['device']} ({report['dtype']}); {report['machine']['cpu']}, "
             f"load {report['machine']['load_average_1min']}",
             "| max_batch | images/s | vs 1 | step ms (1 token/row) | vs 1 | loop step ms | backend calls | "
             "bandwidth floor ms | compute floor ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["records"]:
        lines.append(f"| {r['max_batch']} | {r['images_per_s']:.2f} | {r['images_per_s_vs_1']:.2f}x | "
                     f"{r['step_ms']:.1f} | {r['step_vs_1']:.2f}x | {r['loop_step_ms']:.1f} | "
                     f"{r['backend_calls']:.0f} | {r['bandwidth_floor_ms']:.1f} | {r['compute_floor_ms']:.1f} |")
    if report["torch_pad_vs_group"]:
        pad = report["torch_pad_vs_group"]
        lines += ["", f"torch CPU, 4 rows with runs of 1, 3, 1, 1 tokens: padded {pad['padded_ms']:.1f} ms, grouped "
                  f"{pad['grouped_ms']:.1f} ms"]
    c = report["parallel_categories"]
    if c:
        lines += ["", f"parallel categories, {c['scenario']} ({c['categories']} categories, {c['answer_tokens']}-token "
                  f"answer): decode {c['parallel']['decode_s']:.2f} s vs joint {c['joint']['decode_s']:.2f} s "
                  f"({c['decode_vs_joint']:.2f}x); end to end {c['parallel']['end_to_end_s']:.2f} s vs "
                  f"{c['joint']['end_to_end_s']:.2f} s ({c['end_to_end_vs_joint']:.2f}x); prefill "
                  f"{c['parallel']['prefill_s']:.2f} s vs {c['joint']['prefill_s']:.2f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -P -m rexedge.bench.batched", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cpu-bench", help="preset, checkpoint or bundle (default: cpu-bench)")
    parser.add_argument("--scenario", default="det-448", help="a named scenario or WxH:N/K (default: det-448)")
    parser.add_argument("--images", type=int, default=8, help="images per round (default: 8)")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 4], help="settings, the first is the "
                        "reference of the ratios (default: 1 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", choices=["ort", "torch"], default="ort", help="ort runs the preset's exported "
                        "bundle, torch its checkpoint (default: ort)")
    parser.add_argument("--device", default="cpu", help="cpu (default), or cuda / cuda:N with --backend torch")
    parser.add_argument("--dtype", help="the torch backend's dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own)")
    parser.add_argument("--categories-scenario", metavar="WxH:N/K", help="also time parallel categories against "
                        "the joint prompt on this scenario (e.g. 448x448:24/6)")
    parser.add_argument("--pad-vs-group", action="store_true", help="also time a torch CPU step with runs of "
                        "different lengths padded into one call against grouped (needs a preset or checkpoint)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
