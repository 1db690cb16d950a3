"""Accuracy of a shapes model as users see it: ``python -m rexedge.export.shapes.evaluate MODEL``.

Recall and precision at IoU 0.5 on fresh generated scenes (:mod:`rexedge.export.shapes.scenes`,
seeds from 2**40 on, never used in training), through the real runtime: a checkpoint is
exported to a bundle, which ``RexOmni`` runs (ort by default, structured decoding). A
prediction counts once: per category, predictions and ground-truth boxes are matched
greedily by IoU, highest first; a box under a phrase that is not a requested category, or
one of an absent category, is a false positive.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rexedge.export.shapes.scenes import MAX_PIXELS, MIN_PIXELS, Box, Scene, make_scene
from rexedge.runtime.manifest import MANIFEST

EVAL_SEED = 2**40


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def match_count(predicted: Sequence[Box], truth: Sequence[Box], threshold: float = 0.5) -> int:
    """Pairs (prediction, truth), each used once, with IoU >= threshold; greedy, highest IoU first."""
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(predicted) for j, t in enumerate(truth)), reverse=True)
    used_p: set[int] = set()
    used_t: set[int] = set()
    for value, i, j in pairs:
        if value < threshold:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    return len(used_p)


def score_scene(scene: Scene, predictions: dict[str, list[dict[str, Any]]], threshold: float = 0.5
                ) -> tuple[int, int, int]:
    """(matched, predicted boxes, true boxes) of one scene; ``predictions`` is the official parser's dict."""
    matched = predicted = 0
    for phrase, items in predictions.items():
        boxes = [tuple(item["coords"]) for item in items if item.get("type") == "box"]
        predicted += len(boxes)
        truth = [s.box for s in scene.shapes if s.category == phrase]
        matched += match_count(boxes, truth, threshold)
    return matched, predicted, len(scene.shapes)


def evaluate_bundle(bundle: str | Path, scenes: int = 50, backend: str = "ort", decoding: str = "structured",
                    min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, threshold: float = 0.5,
                    first_seed: int = EVAL_SEED, **options: Any) -> dict[str, float]:
    """Recall, precision and counts on ``scenes`` fresh scenes; ``options`` go to ``RexOmni``."""
    from rexedge.runtime.api import RexOmni

    model = RexOmni(bundle, backend=backend, decoding=decoding, min_pixels=min_pixels, max_pixels=max_pixels,
                    max_tokens=256, **options)
    matched = predicted = truth = 0
    for index in range(scenes):
        scene = make_scene(first_seed + index)
        [result] = model.inference(scene.image, task="detection", categories=list(scene.categories))
        m, p, t = score_scene(scene, result["extracted_predictions"], threshold)
        matched, predicted, truth = matched + m, predicted + p, truth + t
    return {"scenes": scenes, "recall": round(matched / truth, 4) if truth else 0.0,
            "precision": round(matched / predicted, 4) if predicted else 0.0,
            "matched": matched, "predicted": predicted, "truth": truth}


def evaluate_checkpoint(checkpoint: str | Path, work: str | Path, scenes: int = 50, **options: Any) -> dict[str, float]:
    """Export ``checkpoint`` to ``work/bundle`` (replaced) and evaluate it there (see ``evaluate_bundle``)."""
    from rexedge.export.bundle import export_bundle

    bundle = Path(work) / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    export_bundle(checkpoint, bundle, precision="fp32", progress=False)
    return evaluate_bundle(bundle, scenes, **options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a bundle (holds manifest.json) or a checkpoint to export first")
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--decoding", default="structured", choices=("structured", "exact"))
    parser.add_argument("--work", type=Path, default=Path("eval-shapes"), help="where a checkpoint's bundle goes")
    parser.add_argument("--min-pixels", type=int, default=MIN_PIXELS)
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
    args = parser.parse_args(argv)
    common = dict(scenes=args.scenes, decoding=args.decoding, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if (args.model / MANIFEST).exists():
        result = evaluate_bundle(args.model, **common)
    else:
        result = evaluate_checkpoint(args.model, args.work, **common)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
