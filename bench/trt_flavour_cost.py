"""What passing the KV cache in and out costs per decode step: trt flavour vs ort flavour, on ONNX Runtime (CPU).

The ort flavour appends to a max-length cache in place (GroupQueryAttention, IOBinding);
the trt flavour takes ``past_*`` [1, KVH, P, D] and returns ``present_*`` [1, KVH, P+1, D]
(Concat), as TensorRT needs without a plugin. Both run here the way their backends run
them: ort through the ``ort`` backend; trt with two pre-allocated buffers per layer sized
to the context (ping-pong, as ``rexedge.runtime.backends.trt`` does on the GPU), bound
with IOBinding, so the extra cost measured is the Concat's read + write of the cache.

A random checkpoint of the bench config of ``rexedge.bench.decode_context`` (hidden 512,
8 layers, the real head_dim 128 and 2 KV heads) is exported in both flavours; for each
context single-token steps are timed, alternating flavours and contexts, and the median
and p90 after warm-up are reported, with the cache bytes a trt step copies and what that
copy means for the 3B model on a Jetson AGX Orin (a bandwidth estimate, not a measurement).

    python -m rexedge.bench.trt_flavour_cost [--contexts 200 2000] [--steps 40] [--json]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from rexedge.bench.decode_context import (
    BENCH_CONFIG,
    kv_bytes_per_token,
    parse_step_args,
    time_steps,
)
from rexedge.runtime.backends.graph_session import PingPongSession, open_session
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.config import RexOmniConfig

ORIN_BANDWIDTH = 204.8e9  # bytes/s, Jetson AGX Orin (docs/model.md)


class KvInOutDecoder:
    """The trt-flavour decoder on ONNX Runtime as a ping-pong session (the trt backend's scheme), with the
    runner interface of :func:`rexedge.bench.decode_context.time_steps`."""

    def __init__(self, bundle: Path, capacity: int, threads: int | None) -> None:
        b = load_bundle(bundle, verify_hashes=False)
        self.config, self.embed_table = b.config, b.load_embed_table()
        self._session = PingPongSession(open_session(b.path(b.decoder.file), threads, who="trt flavour"),
                                        b.config, capacity)

    @property
    def cache_length(self) -> int:
        return self._session.length

    def prefill(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self._session.reset()
        return self._session.append(embeds, positions)

    def step(self, token_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._session.append(self.embed_table[token_ids], positions)


def main(argv: list[str] | None = None) -> dict:
    args = parse_step_args(__doc__.splitlines()[0], argv)

    from rexedge.export.bundle import export_bundle
    from rexedge.export.fixtures.tiny import write_tiny_checkpoint
    from rexedge.runtime.backends import load_backend

    rng = np.random.default_rng(0)
    capacity = max(args.contexts) + args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "checkpoint", BENCH_CONFIG)
        bundles = {f: export_bundle(checkpoint, Path(tmp) / f, flavour=f, progress=False) for f in ("ort", "trt")}
        runners = {}
        for context in args.contexts:
            runners["ort", context] = load_backend("ort", bundles["ort"], max_context=capacity, threads=args.threads)
            runners["trt", context] = KvInOutDecoder(bundles["trt"], capacity, args.threads)
        times = time_steps(runners, {key: key[1] for key in runners}, args.warmup, args.steps, rng)

    cfg = BENCH_CONFIG
    per_token = kv_bytes_per_token(cfg, 4)
    real_per_token = kv_bytes_per_token(RexOmniConfig.preset("rex-omni-3b"), 2)  # fp16 cache
    rows = []
    for context in args.contexts:
        ort_ms, trt_ms = (float(np.median(times[f, context])) for f in ("ort", "trt"))
        copied = per_token * context  # a step reads the past and writes it again into present
        real_copy_ms = 2 * real_per_token * context / ORIN_BANDWIDTH * 1e3
        rows.append({"context": context, "ort_ms": round(ort_ms, 3), "ort_p90_ms": round(float(np.percentile(
            times["ort", context], 90)), 3), "trt_ms": round(trt_ms, 3), "trt_p90_ms": round(float(np.percentile(
                times["trt", context], 90)), 3), "extra_ms": round(trt_ms - ort_ms, 3),
            "kv_bytes_copied": copied, "rex_omni_3b_fp16_copy_ms_on_orin": round(real_copy_ms, 2)})
    result = {"config": {"hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                         "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim},
              "steps": args.steps, "warmup": args.warmup, "rows": rows}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'context':>8} {'ort ms':>8} {'p90':>7} {'trt ms':>8} {'p90':>7} {'extra':>7} {'KV copied':>10} "
              f"{'3B fp16 copy on Orin':>21}")
        for r in rows:
            print(f"{r['context']:8d} {r['ort_ms']:8.3f} {r['ort_p90_ms']:7.3f} {r['trt_ms']:8.3f} "
                  f"{r['trt_p90_ms']:7.3f} {r['extra_ms']:7.3f} {r['kv_bytes_copied'] / 2**20:8.1f} MiB "
                  f"{r['rex_omni_3b_fp16_copy_ms_on_orin']:18.2f} ms")
        print(f"medians of {args.steps} single-token steps after {args.warmup} warm-up; the 3B column is "
              f"2 x {real_per_token} B/token x context / 204.8 GB/s (read + write), an estimate")
    return result


if __name__ == "__main__":
    main()
