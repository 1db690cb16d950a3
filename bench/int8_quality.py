"""INT8 (Q/DQ, ``rexedge calibrate``) against FP32 on ONNX Runtime (CPU): agreement and decode speed.

For each model (the "tiny" preset, and a larger random checkpoint of the real
architecture: hidden 768, 8 layers, the real head_dim 128, 2 KV heads, M-RoPE sections,
a 256-wide 8-block vision encoder), with random weights drawn like the tiny checkpoints
(they make greedy decoding wander rather than repeat one token):

1. export an fp32 bundle, and an fp16 one as a yardstick: how much does a perturbation
   that is not quantization move the same numbers?
2. calibrate on synthetic scenes (``--calib-images`` of them, a mix of all task prompts)
   and write the INT8 bundle;
3. compare INT8 and FP16 with FP32 on other, held-out scenes (``rexedge.calib.quality``:
   cosine of final hidden states and coordinate logits, teacher-forced greedy agreement
   over ``--steps`` steps, free-running common prefix);
4. time single-token decode steps on the ``ort`` backend after a ``--context``-token
   prefill, alternating between the bundles after warm-up: median and p90 ms/token.

    python -m rexedge.bench.int8_quality [--models tiny medium] [--steps 64] [--json OUT]
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

MODELS: dict[str, RexOmniConfig] = {
    "tiny": RexOmniConfig.preset("tiny"),
    "medium": RexOmniConfig.preset("tiny").replace(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
        mrope_section=(16, 24, 24), vision_depth=8, vision_hidden_size=256, vision_num_heads=4,
        vision_intermediate_size=512, fullatt_block_indexes=(3, 7), vision_out_hidden_size=768),
}


def write_scenes(out: Path, count: int, seed: int) -> Path:
    """Synthetic photos-ish: a smooth colour field with a few solid rectangles and discs, 180-420 px a side."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for i in range(count):
        w, h = (int(v) for v in rng.integers(180, 421, size=2))
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(15, w // 2)), y0 + int(rng.integers(15, h // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        image.save(out / f"scene_{i:02d}.png")
    return out


def time_steps(bundles: dict[str, Path], context: int, warmup: int, steps: int) -> dict[str, dict[str, float]]:
    """ms per single-token ``ort`` step after a ``context``-token prefill; bundles alternate step by step."""
    from rexedge.runtime.backends import load_backend

    rng = np.random.default_rng(0)
    backends = {name: load_backend("ort", path, max_context=context + warmup + steps + 1)
                for name, path in bundles.items()}
    hidden = next(iter(backends.values())).config.hidden_size
    embeds = rng.standard_normal((context, hidden), dtype=np.float32) * 0.05
    for backend in backends.values():
        backend.prefill(embeds, np.tile(np.arange(context, dtype=np.int64), (3, 1)))
    token, position = np.zeros(1, np.int64), np.zeros((3, 1), np.int64)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for i in range(warmup + steps):
        token[0] = rng.integers(2000)
        for name, backend in backends.items():
            position[:] = backend.cache_length
            start = time.perf_counter()
            backend.step(token, position)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(t), "p90_ms": float(np.percentile(t, 90))}
            for name, t in times.items()}


def measure(name: str, cfg: RexOmniConfig, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from rexedge.calib.dataset import find_images, plan_samples
    from rexedge.calib.quality import compare, summarize
    from rexedge.calib.quantize import quantize_bundle
    from rexedge.export.bundle import export_bundle
    from rexedge.export.fixtures.tiny import write_tiny_checkpoint
    from rexedge.runtime.backends import load_backend

    root = tmp / name
    checkpoint = write_tiny_checkpoint(root / "checkpoint", cfg)
    bundles = {precision: export_bundle(checkpoint, root / precision, precision=precision, progress=False)
               for precision in ("fp32", "fp16")}
    calib_images = write_scenes(root / "calib_images", args.calib_images, seed=1)
    eval_images = find_images(write_scenes(root / "eval_images", args.eval_images, seed=2))
    start = time.perf_counter()
    bundles["int8"] = quantize_bundle(bundles["fp32"], root / "int8", calib_images, num=args.num, steps=8,
                                      progress=False)
    calibrate_s = time.perf_counter() - start

    requests = plan_samples(eval_images, None, args.requests, seed=3)
    reference = load_backend("ort", bundles["fp32"])
    quality = {}
    for precision in ("int8", "fp16"):
        candidate = load_backend("ort", bundles[precision])
        quality[precision] = summarize([compare(reference, candidate, r, steps=args.steps) for r in requests])
    speed = time_steps(bundles, args.context, args.warmup, args.timed_steps)
    sizes = {p: sum(f.stat().st_size for f in b.glob(schema.DECODER_FILE + "*")) for p, b in bundles.items()}
    return {"config": {"hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                       "head_dim": cfg.head_dim, "vision_hidden": cfg.vision_hidden_size,
                       "vision_depth": cfg.vision_depth},
            "calibration": {"samples": args.num, "images": args.calib_images,
                            "seconds": round(calibrate_s, 1)},
            "quality_vs_fp32": quality, "decode_step": speed, "decoder_bytes": sizes}


def _print_table(results: dict[str, Any]) -> None:
    keys = ("image_embed_cosine", "hidden_cosine_mean", "hidden_cosine_min", "coord_logit_cosine_mean",
            "coord_logit_cosine_min", "coord_argmax_agreement", "coord_bin_error_mean", "token_agreement",
            "free_run_prefix_mean", "free_run_prefix")
    for name, r in results.items():
        c = r["config"]
        print(f"\n{name}: hidden {c['hidden_size']}, {c['layers']} layers; calibration {r['calibration']}")
        print(f"  {'vs fp32':26s} {'int8':>9s} {'fp16':>9s}")
        for key in keys:
            print(f"  {key:26s} {r['quality_vs_fp32']['int8'][key]:9.4f} {r['quality_vs_fp32']['fp16'][key]:9.4f}")
        for precision, t in r["decode_step"].items():
            print(f"  decode step {precision}: {t['median_ms']:.3f} ms median, {t['p90_ms']:.3f} ms p90 "
                  f"(decoder {r['decoder_bytes'][precision] / 2**20:.1f} MiB)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "medium"])
    parser.add_argument("--steps", type=int, default=64, help="decode steps compared per request")
    parser.add_argument("--requests", type=int, default=8, help="held-out requests compared")
    parser.add_argument("--num", type=int, default=16, help="calibration samples")
    parser.add_argument("--calib-images", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=4)
    parser.add_argument("--context", type=int, default=256, help="prefill length before timed steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--timed-steps", type=int, default=60)
    parser.add_argument("--json", metavar="OUT", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: measure(name, MODELS[name], Path(tmp), args) for name in args.models}
    _print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
