"""Per-frame cost of ``RexOmni.stream`` over plain ``inference`` calls, on a tiny bundle.

The same frame is fed N times, so every call does the same work (same prompt, same
greedy tokens). Three ways are timed in alternating rounds (the first round is warm-up),
so a change in machine load hits each alike:
- plain:        ``model.inference(frame)`` in a loop, time per call;
- stream:       ``model.stream(frames)`` in order, time between consecutive results
                (the next frame is prepared on a thread while the current one decodes);
- stream_serial: the same with ``prepare_ahead=False`` (the threads' hand-off cost alone).
overhead = median(stream) - median(plain); negative when preparing ahead saves more than
the threads cost. CPU time per frame (all threads) is reported too: on a shared, loaded
machine it is the steadier measure of what the threads add. Also reported: the stream's peak resident memory growth between a
short and a long run (bounded memory: about 0).

    python -m rexedge.bench.stream_overhead [--model BUNDLE] [--sizes 96x64 640x480] [--frames 20]
                                            [--rounds 5] [--max-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from rexedge.bench.metrics import summary

WAYS = ("plain", "stream", "stream_serial")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def time_plain(model, frame: np.ndarray, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        model.inference(frame, categories=["cup", "door handle"], channel_order="bgr")
        times.append(time.perf_counter() - start)
    return times


def time_stream(model, frame: np.ndarray, n: int, prepare_ahead: bool) -> list[float]:
    """Seconds between consecutive results; the first result (thread start-up) is not counted."""
    times, last = [], None
    with model.stream([frame] * (n + 1), categories=["cup", "door handle"], channel_order="bgr",
                      prepare_ahead=prepare_ahead) as stream:
        for _ in stream:
            now = time.perf_counter()
            if last is not None:
                times.append(now - last)
            last = now
    return times


def measure(model, frame: np.ndarray, frames: int, rounds: int) -> dict:
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    cpu: dict[str, list[float]] = {way: [] for way in WAYS}
    for round_index in range(rounds):
        runs = {"plain": lambda: time_plain(model, frame, frames),
                "stream": lambda: time_stream(model, frame, frames, True),
                "stream_serial": lambda: time_stream(model, frame, frames, False)}
        for way, run in runs.items():
            cpu_start = time.process_time()
            measured = run()
            if round_index:   # round 0 warms up every way
                times[way] += measured
                # CPU seconds of all this process's threads per frame: what the pipeline costs
                # in work, which a loaded machine's scheduling does not change as much as wall time
                cpu[way].append((time.process_time() - cpu_start) / frames)
    [result] = model.inference(frame, categories=["cup", "door handle"], channel_order="bgr")
    ms = {way: {k: round(v * 1e3, 3) if k != "n" else v for k, v in summary(t).items()} for way, t in times.items()}
    return {"ms_per_frame": ms,
            "overhead_ms": round(ms["stream"]["median"] - ms["plain"]["median"], 3),
            "overhead_serial_ms": round(ms["stream_serial"]["median"] - ms["plain"]["median"], 3),
            "cpu_ms_per_frame": {way: round(float(np.median(c)) * 1e3, 3) for way, c in cpu.items()},
            "output_tokens": result["num_output_tokens"],
            "preprocess_ms": round(result["timings"]["preprocess_s"] * 1e3, 3)}


def memory_growth(model, frame: np.ndarray, short: int, long: int) -> int:
    """Resident memory after a long stream minus after a short one (bytes)."""
    time_stream(model, frame, short, True)
    before = _rss_bytes()
    time_stream(model, frame, long, True)
    return _rss_bytes() - before


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundle directory (default: export a tiny random one)")
    parser.add_argument("--sizes", nargs="+", default=["96x64", "640x480"], help="frame sizes WxH")
    parser.add_argument("--frames", type=int, default=20, help="frames per way per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the first one warm-up")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from rexedge.runtime.api import RexOmni

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.model) if args.model else _tiny_bundle(Path(tmp))
        model = RexOmni(bundle, max_tokens=args.max_tokens)
        rng = np.random.default_rng(0)
        report = {"model": str(args.model or "tiny (random weights)"), "frames": args.frames, "rounds": args.rounds,
                  "sizes": {}}
        for size in args.sizes:
            width, height = (int(v) for v in size.split("x"))
            frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            report["sizes"][size] = measure(model, frame, args.frames, args.rounds)
        frame = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
        report["rss_growth_bytes_20_to_2000_frames"] = memory_growth(model, frame, 20, 2000)
    if args.json:
        print(json.dumps(report))
    else:
        for size, r in report["sizes"].items():
            ms = r["ms_per_frame"]
            print(f"{size:>9}: plain {ms['plain']['median']:.3f} ms (p90 {ms['plain']['p90']:.3f}), "
                  f"stream {ms['stream']['median']:.3f} ms (p90 {ms['stream']['p90']:.3f}), "
                  f"serial stream {ms['stream_serial']['median']:.3f} ms; overhead {r['overhead_ms']:+.3f} ms "
                  f"(serial {r['overhead_serial_ms']:+.3f}); {r['output_tokens']} tokens, "
                  f"preprocess {r['preprocess_ms']:.3f} ms")
            print(f"{'':>9}  CPU per frame (median of rounds): " +
                  ", ".join(f"{way} {v:.3f} ms" for way, v in r["cpu_ms_per_frame"].items()))
        print(f"resident memory growth from a 20- to a 2,000-frame stream: "
              f"{report['rss_growth_bytes_20_to_2000_frames'] / 2**20:.2f} MiB")
    return report


def _tiny_bundle(tmp: Path) -> Path:
    from rexedge.export.bundle import export_bundle
    from rexedge.export.fixtures.tiny import write_tiny_checkpoint

    return export_bundle(write_tiny_checkpoint(tmp / "checkpoint"), tmp / "bundle", progress=False)


if __name__ == "__main__":
    main()
