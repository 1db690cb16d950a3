"""Is an ort decode step flat in the context length? ms/token at ~200 and ~2,000 tokens of context.

A random checkpoint bigger than "tiny" (hidden 512, 8 layers, the real head_dim 128,
2 KV heads and M-RoPE sections) is exported to a bundle and run with the ``ort`` backend.
For each context length a backend is prefilled with that many tokens; then single-token
steps (``backend.step``, as the decode loop calls it) are timed, alternating between
the backends, and the median after warm-up is reported. With the KV cache shared in
place between steps, per-token cost should barely grow with the context: only the
attention over the cached keys grows, never a copy of the cache.

    python -m rexedge.bench.decode_context [--contexts 200 2000] [--steps 40] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rexedge.runtime import manifest as schema
from rexedge.runtime.config import RexOmniConfig

BENCH_CONFIG = RexOmniConfig.preset("tiny").replace(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    mrope_section=(16, 24, 24), max_position_embeddings=8192, vision_out_hidden_size=512)


def kv_bytes_per_token(cfg: RexOmniConfig, itemsize: int) -> int:
    """Bytes the KV cache holds per token (keys and values of every layer)."""
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize


def time_steps(runners: dict[Any, Any], contexts: dict[Any, int], warmup: int, steps: int,
               rng: np.random.Generator) -> dict[Any, list[float]]:
    """ms of each single-token step after warm-up, per runner, each prefilled with its context.

    A runner has ``prefill(embeds, positions)``, ``step(token_ids, positions)``,
    ``cache_length``, ``config`` and ``embed_table`` (a backend, or a stand-in). Steps
    alternate between the runners, so a change in machine load (other processes on a shared
    machine) affects every runner alike instead of the one timed last."""
    for key, runner in runners.items():
        context = contexts[key]
        positions = np.tile(np.arange(context, dtype=np.int64), (3, 1))
        runner.prefill(rng.standard_normal((context, runner.config.hidden_size), dtype=np.float32) * 0.05, positions)
    token = np.zeros(1, np.int64)
    position = np.zeros((3, 1), np.int64)
    times: dict[Any, list[float]] = {key: [] for key in runners}
    for i in range(warmup + steps):
        for key, runner in runners.items():
            token[0] = rng.integers(runner.embed_table.shape[0])
            position[:] = runner.cache_length
            start = time.perf_counter()
            runner.step(token, position)
            if i >= warmup:
                times[key].append((time.perf_counter() - start) * 1e3)
    return times


def parse_step_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    """The options of the step-timing benchmarks: contexts, warm-up and timed steps, ORT threads, --json."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--contexts", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_step_args(__doc__.splitlines()[0], argv)

    from rexedge.export.bundle import export_bundle
    from rexedge.export.fixtures.tiny import write_tiny_checkpoint
    from rexedge.runtime.backends import load_backend

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "checkpoint", BENCH_CONFIG)
        bundle = export_bundle(checkpoint, Path(tmp) / "bundle", progress=False)
        capacity = max(args.contexts) + args.warmup + args.steps
        backends = {c: load_backend("ort", bundle, max_context=capacity, threads=args.threads) for c in args.contexts}
        times = time_steps(backends, {c: c for c in backends}, args.warmup, args.steps, np.random.default_rng(0))
        ms = {context: statistics.median(t) for context, t in times.items()}
        weight_bytes = (bundle / (schema.DECODER_FILE + schema.DATA_SUFFIX)).stat().st_size
    cfg = BENCH_CONFIG
    kv_bytes = kv_bytes_per_token(cfg, 4)
    first, last = args.contexts[0], args.contexts[-1]
    # what a step must read: the weights plus the cached keys/values attention looks at;
    # a per-step copy of the cache would add to this, so the measured ratio stays near it
    read_ratio = (weight_bytes + kv_bytes * last) / (weight_bytes + kv_bytes * first)
    result = {
        "config": {"hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                   "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "decoder_weight_bytes": weight_bytes},
        "ms_per_token": {str(c): round(v, 3) for c, v in ms.items()},
        "ratio_last_to_first": round(ms[last] / ms[first], 3),
        "bytes_read_ratio_last_to_first": round(read_ratio, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for c, v in ms.items():
            print(f"context {c:6d}: {v:7.3f} ms/token (median of {args.steps} after {args.warmup} warm-up)")
        print(f"ratio {last}/{first}: {result['ratio_last_to_first']:.3f}; bytes a step reads (weights "
              f"{weight_bytes / 2**20:.1f} MiB + attended KV) grow {read_ratio:.3f}x")
    return result


if __name__ == "__main__":
    main()
