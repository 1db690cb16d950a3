"""Where a bundle's load time goes: the ONNX Runtime sessions, with and without weight prepacking.

Makes the bundle's sessions (vision, decoder, and the head graph of a weight-quantized bundle) one
after the other with rexedge's session options, plus ``session.disable_prepacking=1`` with
``--no-prepack``; prints each session's creation time and the process's RSS, then the decoder's
median ms per decode step (a 100-token prefill of random embeddings, then 12 single-token steps).
Run each variant in its own process (RSS is the process's):

    python -P -m rexedge.bench.session_load BUNDLE [--no-prepack]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort

from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.graph_session import InPlaceSession, session_options
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.request.positions import decode_positions


def _rss_gib() -> float:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    return round(kib / 2**20, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--no-prepack", action="store_true", help="session.disable_prepacking=1")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle, verify_hashes=False)
    files = {"vision": bundle.vision.file, "decoder": bundle.decoder.file}
    if bundle.head_graph is not None:
        files["head"] = bundle.head_graph[schema.FILE]
    sessions, seconds = {}, {}
    for name, file in files.items():
        options = session_options(None)
        if args.no_prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
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
    print(json.dumps({"prepacking": not args.no_prepack, "session_s": seconds, "sessions_total_s": sum(seconds.values()),
                      "rss_after_sessions_gib": rss_after_sessions, "rss_after_decoding_gib": _rss_gib(),
                      "decode_ms_per_step": round(statistics.median(times[2:]) * 1e3, 1)}))


if __name__ == "__main__":
    main()
