"""The vision encoder on a CPU: float32 against int8 weights and activations (issue 18 item 1).

The vision encoder is compute-bound on a CPU (matrix-matrix products over every image patch), so
int8 arithmetic, not fewer weight bytes, is what could make it faster. ONNX Runtime's dynamic
quantization (``onnxruntime.quantization.quantize_dynamic``) makes that graph from a bundle's vision
graph: MatMul / Gemm weights int8 per output channel, activations quantized per call
(DynamicQuantizeLinear -> MatMulInteger); no calibration images, so it is what an export could do for
every bundle. Both graphs encode the same synthetic images, interleaved, after a warm-up; reported:
median seconds per image, and the agreement of the image embeddings the decoder would read (cosine
per image, and the largest relative error).

    python -P -m rexedge.bench.vision_int8 BUNDLE [--image-size 448x448] [--images 3] [--repeats 3]
        [--threads N] [--work DIR] [--json OUT]

The quantized graph is written to ``--work`` (default: a temporary folder) and reused there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from rexedge.bench.metrics import cpu_name
from rexedge.export.onnx.vision_int8 import QUANTIZED_FILE, quantize_vision
from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.graph_session import open_session
from rexedge.runtime.backends.vision_feeds import vision_feeds
from rexedge.runtime.bundle import Bundle, load_bundle
from rexedge.runtime.request.preprocess import MAX_PIXELS, MIN_PIXELS, preprocess

QUANTIZED = QUANTIZED_FILE


def quantized_vision(bundle: Bundle, work: Path) -> Path:
    """``work/vision.int8.onnx``: the bundle's vision graph as ``rexedge export --vision-weights int8`` makes it
    (reused when ``work`` already holds it)."""
    out = work / QUANTIZED
    if not out.is_file():
        work.mkdir(parents=True, exist_ok=True)
        quantize_vision(bundle.path(bundle.vision.file), work)
    return out


def synthetic_images(count: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    """Smooth random colour fields with blocks (not noise, which no encoder sees in practice)."""
    rng = np.random.default_rng(seed)
    width, height = size
    images = []
    for _ in range(count):
        base = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.BILINEAR)
        pixels = np.asarray(image).copy()
        for _ in range(6):
            x, y = rng.integers(0, width - 16), rng.integers(0, height - 16)
            pixels[y:y + rng.integers(8, height // 3), x:x + rng.integers(8, width // 3)] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(pixels))
    return images


def compare(bundle_dir: Path, image_size: tuple[int, int], images: int, repeats: int, threads: int | None,
            work: Path) -> dict[str, Any]:
    bundle = load_bundle(bundle_dir)
    cfg = bundle.config
    started = time.perf_counter()
    quantized = quantized_vision(bundle, work)
    quantize_s = time.perf_counter() - started
    sessions = {"float32": open_session(bundle.path(bundle.vision.file), threads, bundle.precision),
                "int8": open_session(quantized, threads, bundle.precision)}
    prepared = [preprocess(image, MIN_PIXELS, MAX_PIXELS, cfg=cfg)
                for image in synthetic_images(images, image_size)]
    names = bundle.vision.input_names()

    def encode(session: ort.InferenceSession, index: int) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        out = session.run([schema.IMAGE_EMBEDS], vision_feeds(names, prepared[index]))[0]
        return out, time.perf_counter() - t0

    for session in sessions.values():   # warm-up
        encode(session, 0)
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    embeds: dict[str, list[np.ndarray]] = {name: [None] * images for name in sessions}
    for _ in range(repeats):
        for index in range(images):
            for name, session in sessions.items():   # interleaved, so drift hits both alike
                out, s = encode(session, index)
                seconds[name].append(s)
                embeds[name][index] = out
    cosines, rel_errors = [], []
    for ref, got in zip(embeds["float32"], embeds["int8"]):
        a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        cosines.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        rel_errors.append(float(np.abs(a - b).max() / np.abs(a).max()))
    med = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(bundle_dir), "cpu": cpu_name(), "threads": threads, "image_size": list(image_size),
        "image_tokens": int(prepared[0].num_image_tokens), "images": images, "repeats": repeats,
        "quantize_s": round(quantize_s, 1),
        "seconds_per_image": {name: round(v, 3) for name, v in med.items()},
        "int8_speedup": round(med["float32"] / med["int8"], 3),
        "embed_cosine": {"mean": float(np.mean(cosines)), "min": float(np.min(cosines))},
        "embed_max_rel_error": float(np.max(rel_errors)),
        "bytes": {"float32": sum(bundle.path(f).stat().st_size for f in (bundle.vision.file, bundle.vision.data) if f),
                  "int8": sum(p.stat().st_size for p in work.glob(QUANTIZED + "*"))},
    }


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"--image-size must be WIDTHxHEIGHT, e.g. 448x448, got {text!r}")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -P -m rexedge.bench.vision_int8", description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path, help="an ort-flavour bundle (its vision graph is float32)")
    parser.add_argument("--image-size", type=_size, default=(448, 448))
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--work", type=Path, help="where the quantized graph goes (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rexedge-vision-int8-") as scratch:
        result = compare(args.bundle, args.image_size, args.images, args.repeats, args.threads,
                         args.work or Path(scratch))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
