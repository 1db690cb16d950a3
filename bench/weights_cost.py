"""What weight-only quantized bundles cost and save: float vs ``--weights int8`` vs ``int4``.

A random ``cpu-bench`` checkpoint is exported three times, each export in its own process
(wall time, its peak RSS); then the three bundles' sizes, and decode ms/token of the ort
backend at a ~200-token context, steps interleaved between the bundles (medians after warm-up).

    python -P -m rexedge.bench.weights_cost [--contexts 200] [--steps 40] [--threads N] [--json]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rexedge.bench.decode_context import parse_step_args, time_steps
from rexedge.export.fixtures.tiny import write_tiny_checkpoint
from rexedge.runtime.backends import load_backend

FORMATS = (None, "int8", "int4")

_EXPORT = ("import resource, sys\nfrom rexedge.export.bundle import export_bundle\n"
           "export_bundle(sys.argv[1], sys.argv[2], progress=False, weights=sys.argv[3] or None)\n"
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_step_args(__doc__.splitlines()[0], argv)
    context = args.contexts[0]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "checkpoint", "cpu-bench")
        bundles = {}
        for fmt in FORMATS:
            name = fmt or "float"
            bundles[name] = Path(tmp) / name
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-P", "-c", _EXPORT, str(checkpoint), str(bundles[name]), fmt or ""],
                                 check=True, capture_output=True, text=True).stdout
            rows[name] = {"export_s": round(time.perf_counter() - start, 2),
                          "export_peak_rss_mib": round(int(out.split()[-1]) / 1024, 1),
                          "bundle_mib": round(sum(p.stat().st_size for p in bundles[name].iterdir()) / 2**20, 2),
                          "decoder_data_mib": round((bundles[name] / "decoder.onnx.data").stat().st_size / 2**20, 2)}
        capacity = context + args.warmup + args.steps
        backends = {n: load_backend("ort", b, max_context=capacity, threads=args.threads) for n, b in bundles.items()}
        times = time_steps(backends, {n: context for n in backends}, args.warmup, args.steps, np.random.default_rng())
        for name, t in times.items():
            rows[name]["decode_ms_per_token"] = round(statistics.median(t), 3)
    if args.json:
        print(json.dumps({"context": context, "rows": rows}))
        return
    print(f"cpu-bench, context {context}, median of {args.steps} steps after {args.warmup} warm-up, interleaved")
    for name, row in rows.items():
        print(f"{name:6s} " + "  ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
