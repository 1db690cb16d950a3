"""Results in the COCO results format (the list pycocotools' ``loadRes`` reads).

- box -> {"image_id", "category_id", "bbox": [x, y, w, h], "score"}; corners the model
  wrote swapped (x1 < x0) are ordered, so w and h are never negative.
- polygon (ocr_polygon) -> the same plus "segmentation": [[x0, y0, x1, y1, ...]], with
  the polygon's extent as bbox, so it evaluates both as bbox and as segm.
- keypoint instance -> the same plus "keypoints": [x, y, v, ...] with v = 2 for a
  visible point and 0, 0, 0 for an unvisible one, in the order of ``keypoint_names``
  (default: the order the model wrote them, which follows the prompt).
- point (pointing, gui_pointing) -> refused: COCO has no results format for bare points.

The score is the result's confidence; results without one (the official dictionary,
exact decoding) get 1.0, COCO's required field having no "unknown" value.
Phrases are matched to ``category_ids`` exactly as the model wrote them (it may correct
a category's spelling); results whose phrase has no id are not exported but counted in
``unmatched``, never dropped silently.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.results.detections import UNVISIBLE, Items, flat_coords, official_entries

DEFAULT_SCORE = 1.0


class CocoExportError(RexEdgeError):
    """The results or the category map cannot be written as COCO results."""


class CocoResults(NamedTuple):
    results: list[dict[str, Any]]
    unmatched: dict[str, int]  # phrase -> number of its results left out because it has no category id


def to_coco_results(results: Items, image_id: int, category_ids: Mapping[str, int],
                    keypoint_names: Sequence[str] | None = None) -> CocoResults:
    """COCO result dicts for one image, plus the phrases that had no category id.

    results: typed results (Detection / KeypointInstance) or the official dictionary.
    """
    _check_id("image_id", image_id)
    for phrase, category_id in category_ids.items():
        _check_id(f"category_ids[{phrase!r}]", category_id)
    coco: list[dict[str, Any]] = []
    unmatched: dict[str, int] = {}
    for phrase, entry, score in official_entries(results):
        if entry["type"] == "point":
            raise CocoExportError(
                f"results: {phrase!r} is a point; COCO results have no format for points "
                "(pointing tasks): write them with detections_to_json instead")
        if phrase not in category_ids:
            unmatched[phrase] = unmatched.get(phrase, 0) + 1
            continue
        item: dict[str, Any] = {"image_id": int(image_id), "category_id": int(category_ids[phrase])}
        if entry["type"] == "keypoint":
            item["bbox"] = _xywh([float(v) for v in entry["bbox"]])
            item["keypoints"] = _coco_keypoints(phrase, entry["keypoints"], keypoint_names)
        else:
            coords = flat_coords(entry)
            item["bbox"] = _xywh(coords)
            if entry["type"] == "polygon":
                item["segmentation"] = [coords]
        item["score"] = DEFAULT_SCORE if score is None else float(score)
        coco.append(item)
    return CocoResults(coco, unmatched)


def _check_id(name: str, value: object) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise CocoExportError(f"{name}: expected an int id, got {value!r}")


def _xywh(coords: list[float]) -> list[float]:
    """The extent of interleaved x, y coordinates as [x, y, width, height]."""
    xs, ys = coords[0::2], coords[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _coco_keypoints(phrase: str, keypoints: Mapping[str, Any], names: Sequence[str] | None) -> list[float]:
    if names is None:
        names = list(keypoints)
    else:
        unknown = [name for name in keypoints if name not in names]
        if unknown:
            raise CocoExportError(
                f"keypoint_names: {phrase!r} has keypoints {unknown} that are not among {list(names)}")
    flat: list[float] = []
    for name in names:
        xy = keypoints.get(name)
        visible = xy is not None and xy != UNVISIBLE
        flat += [float(xy[0]), float(xy[1]), 2] if visible else [0.0, 0.0, 0]
    return flat
