"""Accuracy of a shapes model as users see it: ``python -m rexedge.export.shapes.evaluate MODEL``.

Recall and precision at IoU 0.5 on fresh generated scenes (:mod:`rexedge.export.shapes.scenes`,
seeds from 2**40 on, never used in training), through the real runtime: a checkpoint is
exported to a bundle, which ``RexOmni`` runs (ort by default, structured decoding). A
prediction counts once: per category, predictions and ground-truth boxes are matched
greedily by IoU, highest first; a box under a phrase that is not a requested category, or
one of an absent category, is a false positive.

Are the per-box scores informative? AP at IoU 0.5 with the boxes ranked by their score is set
against the mean AP of random rankings of the same boxes (same matches). ``--table`` gives the
whole accuracy table of a checkpoint: ort with each weight setting of ``WEIGHTS`` (float, int8 / int4
decoder weights, int8 vision encoder) and torch (float), each decoding mode of ``DECODINGS``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rexedge.export.shapes.scenes import MAX_PIXELS, MIN_PIXELS, Box, Scene, make_scene
from rexedge.runtime.manifest import MANIFEST
from rexedge.runtime.results.detections import detections_to_json

EVAL_SEED = 2**40


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def match_flags(predicted: Sequence[Box], truth: Sequence[Box], threshold: float = 0.5) -> list[bool]:
    """Which predictions match a truth box with IoU >= threshold, each truth used once; greedy,
    highest IoU first (independent of scores, so that a ranking can be judged on fixed matches)."""
    # ties (a repeated box) go to the earlier prediction
    pairs = sorted((-iou(p, t), i, j) for i, p in enumerate(predicted) for j, t in enumerate(truth))
    used_p: set[int] = set()
    used_t: set[int] = set()
    for negative, i, j in pairs:
        if -negative < threshold:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    return [i in used_p for i in range(len(predicted))]


def match_count(predicted: Sequence[Box], truth: Sequence[Box], threshold: float = 0.5) -> int:
    return sum(match_flags(predicted, truth, threshold))


def scene_matches(scene: Scene, detections: Sequence[dict[str, Any]], threshold: float = 0.5
                  ) -> list[tuple[float | None, bool]]:
    """(score, matched) of each predicted box of one scene; ``detections`` are a result's "detections"
    (phrase, type, coords, score). A box under a phrase that is not a category of the scene's
    shapes (an absent or unrequested one) is unmatched."""
    out: list[tuple[float | None, bool]] = []
    for phrase in dict.fromkeys(d["phrase"] for d in detections):
        boxes = [d for d in detections if d["phrase"] == phrase and d["type"] == "box"]
        truth = [s.box for s in scene.shapes if s.category == phrase]
        flags = match_flags([tuple(d["coords"]) for d in boxes], truth, threshold)
        out += [(d["score"], flag) for d, flag in zip(boxes, flags)]
    return out


def score_scene(scene: Scene, predictions: dict[str, list[dict[str, Any]]], threshold: float = 0.5
                ) -> tuple[int, int, int]:
    """(matched, predicted boxes, true boxes) of one scene; ``predictions`` is the official parser's dict."""
    detections = [{"phrase": phrase, "type": item.get("type"), "coords": item.get("coords"), "score": None}
                  for phrase, items in predictions.items() for item in items]
    matches = scene_matches(scene, detections, threshold)
    return sum(flag for _, flag in matches), len(matches), len(scene.shapes)


def average_precision(ranked: Sequence[bool], truth: int) -> float:
    """Area under the precision-recall curve of predictions in ranked order (True = matched), with
    precision made monotone (each recall level takes the best precision at or beyond it), over ``truth``
    true boxes; predictions that never match lower it only through the precision."""
    if not truth:
        return 0.0
    hits = np.cumsum(ranked)
    precision = hits / np.arange(1, len(ranked) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(precision[np.asarray(ranked, dtype=bool)]) / truth)


def ranking_quality(matches: Sequence[tuple[float | None, bool]], truth: int, permutations: int = 50,
                    seed: int = 0) -> dict[str, float]:
    """AP with boxes ranked by their score (highest first) against the mean AP of random rankings
    of the same boxes: if the scores carry no information the two agree."""
    flags = [flag for _, flag in matches]
    if not flags:
        return {"ap": 0.0, "ap_random": 0.0}
    if any(score is None for score, _ in matches):
        raise ValueError("boxes without a score: ranking needs the runtime's typed detections")
    order = sorted(range(len(flags)), key=lambda i: -matches[i][0])
    rng = np.random.default_rng(seed)
    random_ap = [average_precision([flags[i] for i in rng.permutation(len(flags))], truth) for _ in range(permutations)]
    return {"ap": round(average_precision([flags[i] for i in order], truth), 4),
            "ap_random": round(float(np.mean(random_ap)), 4)}


# decoding modes of the accuracy table: RexOmni options
DECODINGS: dict[str, dict[str, Any]] = {
    "exact": {"decoding": "exact"},
    "structured": {"decoding": "structured"},
    "constrained": {"decoding": "structured", "constrain_phrases": True},
    "constrained+mass": {"decoding": "structured", "constrain_phrases": True, "none_by_mass": True},
    # one branch per category sharing the image's prefill (issue 15): asks the model one category at a time;
    # a scene's prompt holds at most 4 present + 2 absent categories, hence 6 slots
    "parallel": {"decoding": "structured", "constrain_phrases": True, "none_by_mass": True,
                 "parallel_categories": True, "max_batch": 6},
}


def evaluate_bundle(bundle: str | Path, scenes: int = 50, backend: str = "ort", decoding: str = "structured",
                    min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, threshold: float = 0.5,
                    first_seed: int = EVAL_SEED, **options: Any) -> dict[str, float]:
    """Recall, precision, counts, and AP ranked by score vs randomly on ``scenes`` fresh scenes;
    ``bundle`` is a bundle (ort) or a checkpoint (torch); ``options`` go to ``RexOmni``."""
    from rexedge.runtime.api import RexOmni

    model = RexOmni(bundle, backend=backend, decoding=decoding, min_pixels=min_pixels, max_pixels=max_pixels,
                    max_tokens=256, **options)
    matches: list[tuple[float | None, bool]] = []
    truth = 0
    for index in range(scenes):
        scene = make_scene(first_seed + index)
        [result] = model.inference(scene.image, task="detection", categories=list(scene.categories))
        matches += scene_matches(scene, detections_to_json(result["detections"]), threshold)
        truth += len(scene.shapes)
    matched, predicted = sum(flag for _, flag in matches), len(matches)
    return {"scenes": scenes, "recall": round(matched / truth, 4) if truth else 0.0,
            "precision": round(matched / predicted, 4) if predicted else 0.0,
            "matched": matched, "predicted": predicted, "truth": truth, **ranking_quality(matches, truth)}


def teacher_forced(checkpoint: str | Path, scenes: int = 24, min_pixels: int = MIN_PIXELS,
                   max_pixels: int = MAX_PIXELS, first_seed: int = EVAL_SEED) -> dict[str, Any]:
    """Where a model stands, read off its answer to the true prefix (no decoding): at each
    <|box_start|>, is a box (the coordinate rows' total probability) or "None" more likely, for
    present and for absent categories; and per box slot (x0, y0, x1, y1), the mean distance in bins
    between the expected bin and the true one (a model that only learned the prior: ~150-200 for
    x0 / y0), and between the most likely bin and the true one (``slot_argmax_error``: small while the
    expected one is large means the mass is split between distant bins, e.g. x and y both written there),
    and where the last layer's head 0 (the look-up of ``rexedge.export.shapes.train.lookup_loss``) puts its
    attention when each slot is written: on the box's own image tokens (``lookup_mass``), and on other
    shapes' (``lookup_mass_other_shapes``). Separates "cannot tell which category is where" from "cannot
    place the box"."""
    import torch

    from rexedge.export.shapes.train import BACKGROUND, AttentionProbe, image_grid, make_example, object_targets
    from rexedge.runtime.model.checkpoint import load_model
    from rexedge.runtime.model.compact import KVCache
    from rexedge.runtime.request.tokenizer import Tokenizer

    model = load_model(checkpoint, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_dir(Path(checkpoint))
    ids, cfg = tokenizer.ids, model.config
    coords = slice(ids.coord_start, ids.coord_start + ids.num_coords)
    right = {"present": 0, "absent": 0}
    count = {"present": 0, "absent": 0}
    errors: list[list[float]] = [[], [], [], []]
    argmax_errors: list[list[float]] = [[], [], [], []]
    on_box: list[list[float]] = [[], [], [], []]
    on_others: list[list[float]] = [[], [], [], []]
    last = cfg.num_hidden_layers - 1
    with torch.no_grad():
        for index in range(scenes):
            example = make_example(make_scene(first_seed + index), tokenizer, cfg, min_pixels, max_pixels)
            tokens = torch.from_numpy(example.input_ids)[None]
            image = model.encode_image(example.pixel_patches, example.indices)
            embeds = model.embed(tokens).masked_scatter((tokens == cfg.image_token_id)[..., None], image)
            length, positions = tokens.shape[1], torch.from_numpy(example.positions)[:, None]
            probe = AttentionProbe(range(last, last + 1))
            hidden = model.decode(embeds, positions, KVCache.allocate(cfg, 1, length), torch.arange(length),
                                  kv_length=length, ops=probe)
            attention = probe.probs[last][0, 0]  # [T, T]
            grid = image_grid(tokens, positions, cfg.image_token_id)
            classes, boxes = object_targets(grid, [example])
            token_index = grid["mask"].nonzero(as_tuple=True)[1]
            probs = torch.softmax(model.logits(hidden[0]).float(), dim=-1)
            answer = example.input_ids
            slot = 0
            for t in range(example.num_prompt - 1, length - 1):
                target = int(answer[t + 1])
                if answer[t] == ids.box_start:
                    kind = "absent" if target == ids.none[0] else "present"
                    box_mass, none_mass = float(probs[t, coords].sum()), float(probs[t, ids.none[0]])
                    count[kind] += 1
                    right[kind] += (box_mass > none_mass) == (kind == "present")
                    slot = 0
                if coords.start <= target < coords.stop:
                    if slot % 4 == 0:   # this box's image tokens, and other shapes'
                        box = torch.tensor([float(answer[t + 1 + j] - coords.start) for j in range(4)])
                        own = (classes != BACKGROUND) & (boxes == box).all(dim=1)
                        mine, theirs = token_index[own], token_index[(classes != BACKGROUND) & ~own]
                    if len(mine):   # not hidden under another shape
                        on_box[slot % 4].append(float(attention[t, mine].sum()))
                        on_others[slot % 4].append(float(attention[t, theirs].sum()))
                    row = probs[t, coords]
                    expected = float((row * torch.arange(ids.num_coords)).sum() / row.sum())
                    errors[slot % 4].append(abs(expected - (target - coords.start)))
                    argmax_errors[slot % 4].append(abs(int(row.argmax()) - (target - coords.start)))
                    slot += 1
    def per_slot(values: list[list[float]], digits: int = 1) -> dict[str, float | None]:
        return {name: round(float(np.mean(e)), digits) if e else None
                for name, e in zip(("x0", "y0", "x1", "y1"), values)}

    return {"present_right": f"{right['present']}/{count['present']}", "absent_right": f"{right['absent']}/{count['absent']}",
            "slot_error": per_slot(errors), "slot_argmax_error": per_slot(argmax_errors),
            "lookup_mass": per_slot(on_box, 3), "lookup_mass_other_shapes": per_slot(on_others, 3)}


# weight settings of the accuracy table: (decoder weights, vision weights) of ``export_bundle``
WEIGHTS: dict[str, tuple[str | None, str | None]] = {
    "float": (None, None), "int8": ("int8", None), "int4": ("int4", None),
    "vision-int8": (None, "int8"),   # float decoder, int8 vision encoder (export --vision-weights int8)
}


def export_for_evaluation(checkpoint: str | Path, bundle: Path, weights: str = "float") -> Path:
    """Export ``checkpoint`` to ``bundle`` (replaced): fp32, with the weights of ``WEIGHTS[weights]``."""
    from rexedge.export.bundle import export_bundle

    shutil.rmtree(bundle, ignore_errors=True)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    decoder, vision = WEIGHTS[weights]
    return export_bundle(checkpoint, bundle, precision="fp32", progress=False, weights=decoder, vision_weights=vision)


def evaluate_checkpoint(checkpoint: str | Path, work: str | Path, scenes: int = 50, **options: Any) -> dict[str, float]:
    """Export ``checkpoint`` to ``work/bundle`` (replaced) and evaluate it there (see ``evaluate_bundle``)."""
    return evaluate_bundle(export_for_evaluation(checkpoint, Path(work) / "bundle"), scenes, **options)


def accuracy_table(checkpoint: str | Path, work: str | Path, scenes: int = 50,
                   weights: Sequence[str] = tuple(WEIGHTS), decodings: Sequence[str] = tuple(DECODINGS),
                   torch_backend: bool = True, **options: Any) -> list[dict[str, Any]]:
    """One row per (backend, weights, decoding mode): ort on a bundle per weight setting (``WEIGHTS``), and the
    torch backend on the checkpoint itself (float only: it has no quantized linear layers)."""
    settings = [("ort", w, Path(work) / w) for w in weights] + ([("torch", "float", Path(checkpoint))]
                                                                 if torch_backend else [])
    rows = []
    for backend, weight, model in settings:
        if backend == "ort":
            export_for_evaluation(checkpoint, model, weight)
        for decoding in decodings:
            result = evaluate_bundle(model, scenes, backend=backend, **DECODINGS[decoding], **options)
            rows.append({"backend": backend, "weights": weight, "mode": decoding, **result})
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    columns = ("backend", "weights", "mode", "recall", "precision", "ap", "ap_random", "matched", "predicted", "truth")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a bundle (holds manifest.json) or a checkpoint to export first")
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--decoding", default="structured", choices=tuple(DECODINGS))
    parser.add_argument("--table", action="store_true",
                        help="a checkpoint's whole table: ort x every weight setting and torch x float, every decoding mode")
    parser.add_argument("--teacher-forced", action="store_true",
                        help="a checkpoint's presence and per-slot coordinate error on the true prefix (no decoding)")
    parser.add_argument("--work", type=Path, default=Path("eval-shapes"), help="where a checkpoint's bundles go")
    parser.add_argument("--min-pixels", type=int, default=MIN_PIXELS)
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
    args = parser.parse_args(argv)
    pixels = dict(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    is_bundle = (args.model / MANIFEST).exists()
    if args.teacher_forced:
        if is_bundle:
            parser.error(f"--teacher-forced: {args.model} is a bundle; give the checkpoint it was exported from")
        print(json.dumps(teacher_forced(args.model, args.scenes, **pixels)))
        return
    if args.table:
        if is_bundle:
            parser.error(f"--table: {args.model} is a bundle; give the checkpoint it was exported from")
        print(markdown_table(accuracy_table(args.model, args.work, args.scenes, **pixels)))
        return
    common = dict(scenes=args.scenes, **DECODINGS[args.decoding], **pixels)
    if is_bundle:
        result = evaluate_bundle(args.model, **common)
    else:
        result = evaluate_checkpoint(args.model, args.work, **common)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
