"""Where a bundle's load time goes: the ONNX Runtime sessions, with and without weight prepacking.

Makes the bundle's sessions (vision, decoder, and the head graph of a weight-quantized bundle) one
after the other with rexedge's session options, plus ``session.disable_prepacking=1`` with
``--no-prepack``, ``session.prepack.enable_parallel=1`` with ``--parallel-prepack``, or from this
CPU's prepacked graphs (``rexedge prepack``, loaded without re-optimizing) with ``--prepacked``;
prints each session's creation time and the process's RSS, then the decoder's median ms per decode
step (a 100-token prefill of random embeddings, then 12 single-token steps). Run each variant in its
own process (RSS is the process's):

    python -P -m rexedge.bench.session_load BUNDLE [--threads 2] [--no-prepack | --parallel-prepack | --prepacked]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort

from rexedge.runtime.backends.graph_session import InPlaceSession, session_options
from rexedge.runtime.backends.prepacked import cpu_target, prepacked_graphs, source_graphs
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.request.positions import decode_positions


def _rss_gib() -> float:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    return round(kib / 2**20, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int)
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--no-prepack", action="store_true", help="session.disable_prepacking=1")
    variant.add_argument("--parallel-prepack", action="store_true", help="session.prepack.enable_parallel=1")
    variant.add_argument("--prepacked", action="store_true", help="this CPU's prepacked graphs (rexedge prepack)")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle, verify_hashes=False)
    files = source_graphs(bundle)
    if args.prepacked:
        files = prepacked_graphs(bundle)
        if not files:
            parser.error(f"{args.bundle} has no prepacked graphs for {cpu_target()}: run rexedge prepack first")
    sessions, seconds = {}, {}
    for name, file in files.items():
        options = session_options(args.threads)
        if args.no_prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if args.parallel_prepack:
            options.add_session_config_entry("session.prepack.enable_parallel", "1")
        if args.prepacked:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        start = time.perf_counter()
        sessions[name] = ort.InferenceSession(str(bundle.path(file)), options, providers=["CPUExecutionProvider"])
        seconds[name] = round(time.perf_counter() - start, 2)
    rss_after_sessions = _rss_gib()
    cfg = bundle.config
    decoder = InPlaceSession(sessions["decoder"], cfg, 512, np.float32, "cpu", 0)
    rng = np.random.default_rng(0)
    decoder.reset()
    decoder.append(rng.standard_normal((100, cfg.hidden_size)).astype(np.float32) * 0.02, np.tile(np.arange(100), (3, 1)))
    times = []
    for _ in range(12):
        embeds = rng.standard_normal((1, cfg.hidden_size)).astype(np.float32) * 0.02
        start = time.perf_counter()
        decoder.append(embeds, decode_positions(decoder.length, 0))
        times.append(time.perf_counter() - start)
    chosen = next((v for v in ("no_prepack", "parallel_prepack", "prepacked") if getattr(args, v)), "default")
    print(json.dumps({"variant": chosen, "session_s": seconds, "sessions_total_s": sum(seconds.values()),
                      "rss_after_sessions_gib": rss_after_sessions, "rss_after_decoding_gib": _rss_gib(),
                      "decode_ms_per_step": round(statistics.median(times[2:]) * 1e3, 1)}))


if __name__ == "__main__":
    main()
