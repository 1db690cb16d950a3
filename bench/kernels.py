"""GPU measurements of issue 5: kernel bandwidth, decode ms/token, TTFT, against transformers generate.

Needs a CUDA device (run it where one is lent); nothing is downloaded: the rex-omni-3b
weights are random normals generated on the GPU (speed depends on shapes, not values).

1. Memory bandwidth ceiling: a 1 GiB device-to-device copy (bytes read + written).
2. Restricted head (bf16 table 151,936 x 2,048): full vocabulary, the 1,000 coordinate
   rows (64 windows rotated so the 4 MB never sits in L2) and 7 choice ids; GB/s of table
   rows read, against ``F.linear`` + ``argmax`` over the full table.
3. Decode attention, 3B shapes (16 heads, 2 KV heads, head_dim 128) at context 1,600:
   rotating over 36 layers' caches (59 MB > L2), GB/s of cached k/v read.
4. Decode ms/token of the torch CUDA backend (CUDA graphs) at context ~1,600, free steps
   (full head) and coordinate steps (1,000 rows) alternating; the floor is the bytes a
   step must read over the measured copy bandwidth.
5. TTFT for a 1440x810 image (1,479 image tokens): preprocess + vision + prefill + first token.
6. transformers ``generate`` (eager attention) on the same random weights: TTFT and ms/token.

Medians after warm-up, with p90. Prints a table last and writes JSON:

    python -m rexedge.bench.kernels [--out bench_kernels.json] [--steps 100] [--skip-hf]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch

from rexedge.runtime.config import RexOmniConfig

CONTEXT = 1600
IMAGE_HW = (810, 1440)     # -> 1428 x 812 px -> 1,479 image tokens


def bench(fn: Callable[[], Any]) -> tuple[float, float]:
    """(median, p90) ms of ``fn`` timed with CUDA events by triton.testing.do_bench."""
    import triton.testing

    median, p90 = triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.9])
    return median, p90


def wall(fn: Callable[[], Any], warmup: int, repeat: int) -> tuple[float, float]:
    """(median, p90) ms of ``fn`` by host clock around a synchronised call (for whole steps that sync anyway)."""
    times = []
    for i in range(warmup + repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def copy_bandwidth() -> dict:
    x = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)   # 1 GiB
    y = torch.empty_like(x)
    median, p90 = bench(lambda: y.copy_(x))
    moved = 2 * x.numel() * x.element_size()
    return {"bytes": moved, "ms": median, "p90_ms": p90, "GB/s": moved / median / 1e6}


def head_kernels(cfg: RexOmniConfig) -> dict:
    from rexedge.kernels.restricted_head import restricted_head

    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    table = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    h = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    seen = torch.zeros(1, vocab, dtype=torch.uint8, device="cuda")
    seen[0, torch.randint(0, vocab, (1600,), device="cuda")] = 1
    out = {}
    row_bytes = hidden * table.element_size()
    median, p90 = bench(lambda: restricted_head(h, table, seen, 0, vocab, None, 1.05))
    out["full"] = {"rows": vocab, "ms": median, "p90_ms": p90, "GB/s": vocab * row_bytes / median / 1e6}
    median, p90 = bench(lambda: torch.argmax(torch.nn.functional.linear(h, table), dim=-1))
    out["full_torch_linear_argmax"] = {"rows": vocab, "ms": median, "p90_ms": p90, "GB/s": vocab * row_bytes / median / 1e6}
    windows = iter(range(1 << 30))

    def coord() -> None:  # a different 1,000-row window each call, so L2 never holds the rows read
        start = (next(windows) % 64) * 2048
        restricted_head(h, table, seen, start, start + 1000, None, 1.05)

    median, p90 = bench(coord)
    out["coord"] = {"rows": 1000, "ms": median, "p90_ms": p90, "GB/s": 1000 * row_bytes / median / 1e6}
    ids = torch.tensor([11, 220, 198, 4064, 151649, 151645, 151647], device="cuda")
    median, p90 = bench(lambda: restricted_head(h, table, seen, 0, 0, ids, 1.05))
    out["choice7"] = {"rows": 7, "ms": median, "p90_ms": p90}
    return out


def attention_kernel(cfg: RexOmniConfig) -> dict:
    from rexedge.kernels.decode_attention import decode_attention

    layers, kvh, hq, d, s_max = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, 2048
    caches = [(torch.randn(1, kvh, s_max, d, device="cuda", dtype=torch.bfloat16),
               torch.randn(1, kvh, s_max, d, device="cuda", dtype=torch.bfloat16)) for _ in range(layers)]
    q = torch.randn(1, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, kvh, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 1, kvh, d, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(1, 1, d, device="cuda")
    cos, sin = angles.cos(), angles.sin()
    cache_len = torch.tensor([CONTEXT - 1], dtype=torch.int32, device="cuda")
    turn = iter(range(1 << 30))

    def one() -> None:
        kc, vc = caches[next(turn) % layers]
        decode_attention(q, k, v, cos, sin, kc, vc, cache_len, context_bound=s_max)

    median, p90 = bench(one)
    moved = 2 * kvh * CONTEXT * d * 2
    return {"context": CONTEXT, "ms": median, "p90_ms": p90, "GB/s": moved / median / 1e6}


def random_model(cfg: RexOmniConfig, dtype: torch.dtype, seed: int = 0):
    """The compact model with N(0, 0.02) weights (norm scales 1) made directly on the GPU."""
    from rexedge.runtime.model.compact import RexOmniModel

    with torch.device("meta"):
        model = RexOmniModel(cfg).to(dtype)
    model = model.to_empty(device="cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_q" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def synthetic_prompt(cfg: RexOmniConfig, num_image_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Chat-template-shaped ids: 15 text, <|vision_start|>, image pads, <|vision_end|>, 40 text."""
    text = lambda n: rng.integers(0, 150000, n)  # noqa: E731  (ordinary tokens, below the specials)
    return np.concatenate([text(15), [cfg.vision_start_token_id], np.full(num_image_tokens, cfg.image_token_id),
                           [cfg.vision_end_token_id], text(40)]).astype(np.int64)


def decode_and_ttft(cfg: RexOmniConfig, model, steps: int) -> dict:
    from rexedge.runtime.backends.torch_cuda import TorchCudaBackend
    from rexedge.runtime.decode.head import Sampling
    from rexedge.runtime.request.encode import embed_prompt
    from rexedge.runtime.request.positions import rope_positions
    from rexedge.runtime.request.preprocess import preprocess

    backend = TorchCudaBackend.from_model(model, max_context=2048)
    head = backend.make_head(Sampling())
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}

    # decode at context ~1,600: free and coordinate steps alternate, so drift affects both alike
    embeds = rng.standard_normal((CONTEXT, cfg.hidden_size), dtype=np.float32) * 0.02
    positions = np.tile(np.arange(CONTEXT, dtype=np.int64), (3, 1))
    hidden = backend.prefill(embeds, positions)
    head.reset(rng.integers(0, cfg.vocab_size, CONTEXT))
    coord_start = cfg.vocab_size - 1000 - 293  # where <0>..<999> sit in the real vocabulary (150643)
    times: dict[str, list[float]] = {"free": [], "coord": []}
    token = 100
    for i in range(2 * (steps + 10)):
        kind = "free" if i % 2 == 0 else "coord"
        t0 = time.perf_counter()
        length = backend.cache_length
        hidden = backend.step(np.array([token]), np.full((3, 1), length, dtype=np.int64))
        if kind == "free":
            token, _ = head.choose_full(hidden)
        else:
            token, _ = head.choose_range(hidden, coord_start, coord_start + 1000)
        head.observe(token)
        if i >= 20:
            times[kind].append((time.perf_counter() - t0) * 1e3)
    decoder_bytes = sum(p.numel() * p.element_size() for n, p in model.model.named_parameters() if "embed_tokens" not in n)
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (CONTEXT + steps) * cfg.head_dim * 2
    row = cfg.hidden_size * 2
    for kind, rows in (("free", cfg.vocab_size), ("coord", 1000)):
        t = sorted(times[kind])
        out[f"decode_{kind}"] = {"ms": statistics.median(t), "p90_ms": t[int(0.9 * (len(t) - 1))],
                                 "bytes": decoder_bytes + kv_bytes + rows * row, "steps": len(t)}

    # TTFT: image in -> first token out
    image = (rng.random((*IMAGE_HW, 3)) * 255).astype(np.uint8)

    def ttft() -> dict:
        t0 = time.perf_counter()
        pre = preprocess(image, cfg=cfg)
        ids = synthetic_prompt(cfg, pre.num_image_tokens, rng)
        pos, _ = rope_positions(ids, cfg.image_token_id, cfg.vision_start_token_id, pre.merged_grid_hw)
        t1 = time.perf_counter()
        image_embeds = backend.encode_image(pre)
        t2 = time.perf_counter()
        h = backend.prefill(embed_prompt(backend.embed_table, ids, image_embeds, cfg.image_token_id), pos)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        head.reset(ids)
        head.choose_full(h)
        t4 = time.perf_counter()
        return {"image_tokens": pre.num_image_tokens, "prompt_tokens": int(ids.size), "preprocess_ms": (t1 - t0) * 1e3,
                "vision_ms": (t2 - t1) * 1e3, "prefill_ms": (t3 - t2) * 1e3, "first_token_ms": (t4 - t3) * 1e3,
                "ttft_ms": (t4 - t0) * 1e3}

    runs = [ttft() for _ in range(6)][1:]
    out["ttft"] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return out


def transformers_generate(cfg: RexOmniConfig, model, steps: int) -> dict:
    """transformers eager generate on the same weights: TTFT (1 new token) and ms/token over ``steps`` more."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from rexedge.runtime.model.checkpoint import published_name
    from rexedge.runtime.request.preprocess import preprocess

    with torch.device("cuda"):
        hf = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig.from_dict(cfg.to_hf_dict()),
                                                              attn_implementation="eager", dtype=torch.bfloat16)
    ours = model.state_dict()
    with torch.no_grad():
        for name, tensor in hf.state_dict().items():
            if name != "lm_head.weight" or not cfg.tie_word_embeddings:
                tensor.copy_(ours[published_name(name)])
    hf.tie_weights()
    hf.eval()
    rng = np.random.default_rng(1)
    pre = preprocess((rng.random((*IMAGE_HW, 3)) * 255).astype(np.uint8), cfg=cfg)
    ids = torch.from_numpy(synthetic_prompt(cfg, pre.num_image_tokens, rng))[None].cuda()
    pixels = torch.from_numpy(np.asarray(pre.pixel_patches, np.float32)).cuda().to(torch.bfloat16)
    grid = torch.tensor([pre.grid_thw], device="cuda")

    def generate(n: int) -> None:
        # transformers >= 5 needs mm_token_type_ids for Qwen2.5-VL's 3-D positions (1-D without it, silently)
        hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_grid_thw=grid,
                    mm_token_type_ids=(ids == cfg.image_token_id).int(), max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.05)

    with torch.inference_mode():
        first, first_p90 = wall(lambda: generate(1), warmup=1, repeat=5)
        many, _ = wall(lambda: generate(steps + 1), warmup=1, repeat=3)
    return {"ttft_ms": first, "ttft_p90_ms": first_p90, "decode_ms_per_token": (many - first) / steps,
            "prompt_tokens": int(ids.shape[1])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_kernels.json")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--skip-hf", action="store_true", help="skip transformers generate")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels needs a CUDA device")
    cfg = RexOmniConfig.preset("rex-omni-3b")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                               "torch": torch.__version__}

    def section(name: str, fn: Callable[[], Any]) -> None:
        try:   # a failing section is recorded and the others still run
            results[name] = fn()
        except Exception:  # noqa: BLE001
            results[name] = {"error": traceback.format_exc()}
        torch.cuda.empty_cache()

    section("copy", copy_bandwidth)
    section("head", lambda: head_kernels(cfg))
    section("attention", lambda: attention_kernel(cfg))
    model = random_model(cfg, torch.bfloat16)
    section("backend", lambda: decode_and_ttft(cfg, model, args.steps))
    if not args.skip_hf:
        section("transformers", lambda: transformers_generate(cfg, model, args.steps))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)

    bw = results["copy"].get("GB/s")
    print(f"{results['device']}  {results['date']}  copy {bw and round(bw)} GB/s")
    print(f"{'measurement':34s} {'median ms':>10s} {'p90 ms':>9s} {'GB/s':>8s} {'% copy':>7s}")
    rows = []
    for group in ("head", "attention", "backend", "transformers"):
        entries = results.get(group, {})
        if "error" in entries:
            print(f"{group:34s} FAILED (see {args.out})")
            continue
        items = entries.items() if group != "attention" else [("decode_attention", entries)]
        for name, e in items:
            if isinstance(e, dict) and "ms" in e:
                gbs = e.get("GB/s") or (e["bytes"] / e["ms"] / 1e6 if "bytes" in e else None)
                rows.append((f"{group}.{name}", e["ms"], e.get("p90_ms"), gbs))
        if group == "backend" and "ttft" in entries:
            rows.append(("backend.ttft", entries["ttft"]["ttft_ms"], None, None))
        if group == "transformers" and entries:
            rows.append(("transformers.ttft", entries["ttft_ms"], entries["ttft_p90_ms"], None))
            rows.append(("transformers.decode_per_token", entries["decode_ms_per_token"], None, None))
    for name, ms, p90, gbs in rows:
        pct = f"{100 * gbs / bw:6.1f}%" if gbs and bw else ""
        print(f"{name:34s} {ms:10.3f} {p90 if p90 is not None else float('nan'):9.3f} "
              f"{gbs if gbs else float('nan'):8.1f} {pct:>7s}")


if __name__ == "__main__":
    main()
