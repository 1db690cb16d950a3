"""Peak resident memory while loading a checkpoint with ``load_model``.

    python -m rexedge.bench.load_rss                 # writes a random rex-omni-3b bf16 checkpoint (~7.5 GB)
                                                     # to a temporary directory, measures, deletes it
    python -m rexedge.bench.load_rss --checkpoint DIR  # measures an existing checkpoint

The load runs in a fresh interpreter so that ``ru_maxrss`` (the process's peak resident
set) covers nothing but imports and the load. Prints one JSON object: the weight bytes
of the loaded model, the peak RSS, the RSS before loading (imports), and the ratio of the
load's own peak (peak minus before) to the weight bytes; about 1.0 means one copy.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(checkpoint: Path, dtype_name: str) -> dict[str, float]:
    """Load ``checkpoint`` in this process and report its memory (call in a fresh interpreter)."""
    import torch

    from rexedge.runtime.model.checkpoint import load_model

    before = _rss_bytes()
    start = time.perf_counter()
    model = load_model(checkpoint, dtype=getattr(torch, dtype_name))
    seconds = time.perf_counter() - start
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {
        "checkpoint": str(checkpoint),
        "dtype": dtype_name,
        "weight_bytes": weight_bytes,
        "ru_maxrss_bytes": peak,
        "rss_before_load_bytes": before,
        "load_peak_over_weights": round((peak - before) / weight_bytes, 3),
        "load_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="an existing checkpoint directory (default: write one)")
    parser.add_argument("--preset", default="rex-omni-3b", help="preset of the checkpoint to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--measure-here", action="store_true", help=argparse.SUPPRESS)  # the fresh child process
    args = parser.parse_args(argv)

    if args.measure_here:
        print(json.dumps(measure(args.checkpoint, args.dtype)))
        return

    scratch = None
    checkpoint = args.checkpoint
    if checkpoint is None:
        from rexedge.export.fixtures.tiny import write_tiny_checkpoint

        scratch = Path(tempfile.mkdtemp(prefix="rexedge-load-rss-"))
        start = time.perf_counter()
        checkpoint = write_tiny_checkpoint(scratch / args.preset, preset=args.preset, dtype=args.dtype)
        print(f"wrote {checkpoint} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    try:
        child = subprocess.run(
            [sys.executable, "-m", "rexedge.bench.load_rss", "--measure-here", "--checkpoint", str(checkpoint),
             "--dtype", args.dtype], check=True, stdout=subprocess.PIPE, text=True)
        print(child.stdout.strip())
    finally:
        if scratch is not None and not args.keep:
            shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
