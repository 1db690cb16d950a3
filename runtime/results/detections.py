"""Typed results: what the grammar emits and the API returns.

Three views of one answer:
- typed: ``Detection`` (box, point, polygon) and ``KeypointInstance``, with the model's
  bins kept beside the pixel coordinates and an optional confidence;
- the official Rex-Omni dictionary, ``{phrase: [entry, ...]}``, so that code written for
  the official package runs unchanged (``to_official``);
- plain JSON-serialisable dicts for JSONL output (``detections_to_json`` and back).

Pixel coordinates are always in the ORIGINAL image: x = bin / 999 * width (computed in
that order, as the official parser does, so both give bit-identical floats).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from rexedge.runtime.errors import RexEdgeError

GEOMETRY_KINDS = ("box", "point", "polygon")
UNVISIBLE = "unvisible"  # the official spelling of a keypoint the model marked as not visible


class ResultFormatError(RexEdgeError):
    """Results given to an exporter are neither typed results nor an official dictionary."""


@dataclass
class Detection:
    """One box, point or polygon, as soon as the grammar has seen it complete.

    bins are the model's coordinate tokens (0..999, x first); coords are pixels in the
    ORIGINAL image: x = bin / 999 * width, y = bin / 999 * height.
    """

    kind: str                    # "box" (x0, y0, x1, y1) | "point" (x, y) | "polygon" (x0, y0, x1, y1, ...)
    phrase: str                  # as the model wrote it (may differ from the requested category)
    bins: tuple[int, ...]
    coords: tuple[float, ...]
    score: float | None = None   # confidence from the restricted softmax, filled by the decode loop

    def to_official(self) -> dict[str, Any]:
        """The official parser's entry: box/point coords flat, a polygon as [x, y] pairs."""
        if self.kind == "polygon":
            xy = [[self.coords[i], self.coords[i + 1]] for i in range(0, len(self.coords), 2)]
            return {"type": "polygon", "coords": xy}
        return {"type": self.kind, "coords": list(self.coords)}


@dataclass
class KeypointInstance:
    """One instance of the keypoint task: its box and its named keypoints.

    phrase is the category the official parser derives from the instance id (the leading
    ASCII letters and underscores: "person1" -> "person"). keypoints keeps the model's
    order; a point the model marked "unvisible" (or wrote malformed) is None.
    """

    phrase: str
    instance_id: str
    bbox: Detection
    keypoints: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    score: float | None = None   # the reference gives none; exporters treat None as unknown

    def to_official(self) -> dict[str, Any]:
        keypoints = {name: UNVISIBLE if xy is None else [xy[0], xy[1]] for name, xy in self.keypoints.items()}
        return {"type": "keypoint", "bbox": list(self.bbox.coords), "keypoints": keypoints,
                "instance_id": self.instance_id}


Item = Union[Detection, KeypointInstance]   # one found thing (the whole answer is a ``result.Result``)
OfficialDict = Mapping[str, Sequence[Mapping[str, Any]]]
Items = Union[Sequence[Item], OfficialDict]


def bins_to_pixels(bins: Sequence[int], width: int, height: int) -> tuple[float, ...]:
    """Pixel coordinates of interleaved (x, y) bins in the original image."""
    return tuple(b / 999 * (width if i % 2 == 0 else height) for i, b in enumerate(bins))


def to_official(results: Iterable[Item], absent: Iterable[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """The official Rex-Omni dictionary for typed results (e.g. the grammar's detections).

    absent: phrases the model answered "None"; they appear with an empty list, as in the
    official parser. Phrases are stripped of surrounding whitespace like the official
    parser does. Keys follow first appearance among ``results``, then ``absent``; Python
    dicts compare equal regardless of order, and only JSON text shows the difference.
    One deliberate difference: the official parser drops a group whose phrase contains
    "<" or is empty; typed results keep it.
    """
    official: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        official.setdefault(result.phrase.strip(), []).append(result.to_official())
    for phrase in absent:
        official.setdefault(phrase.strip(), [])
    return official


def official_entries(results: Items) -> list[tuple[str, dict[str, Any], float | None]]:
    """(phrase, official entry, score) for each result, from typed results or an official dict.

    The exporters (COCO, drawing, JSON) read this one shape. Official dictionaries carry
    no score, so their entries have None.
    """
    if isinstance(results, Mapping):
        entries = []
        for phrase, items in results.items():
            if not isinstance(phrase, str) or isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
                raise ResultFormatError(
                    f"official results: expected {{phrase: [entry, ...]}}, got {phrase!r}: {type(items).__name__}")
            for item in items:
                _check_official_entry(phrase, item)
                entries.append((phrase, dict(item), None))
        return entries
    return [(result.phrase.strip(), result.to_official(), result.score) for result in _typed(results)]


def _typed(results: Iterable[Item]) -> list[Item]:
    if isinstance(results, (str, bytes)) or not isinstance(results, Iterable):
        raise ResultFormatError(
            "results: expected a list of Detection / KeypointInstance or an official dict, "
            f"got {type(results).__name__}")
    results = list(results)
    for result in results:
        if not isinstance(result, (Detection, KeypointInstance)):
            raise ResultFormatError(
                f"results: expected Detection or KeypointInstance items, got {type(result).__name__}")
    return results


def _check_official_entry(phrase: str, item: Any) -> None:
    kind = item.get("type") if isinstance(item, Mapping) else None
    if kind in GEOMETRY_KINDS and "coords" in item:
        return
    if kind == "keypoint" and {"bbox", "keypoints"} <= item.keys():
        return
    raise ResultFormatError(
        f"official results: entry of {phrase!r} must be a dict with type box/point/polygon and coords, "
        f"or type keypoint with bbox and keypoints; got {item!r}")


def detections_to_json(results: Items) -> list[dict[str, Any]]:
    """Plain, JSON-serialisable dicts, one per result (for JSONL output).

    A geometry: {"phrase", "type", "coords" (flat x, y, ...), "bins" (None when read from
    an official dict, which has no bins), "score" (None when unknown)}. A keypoint
    instance: {"phrase", "type": "keypoint", "instance_id", "bbox", "bbox_bins",
    "keypoints" {name: [x, y] or None}, "score"}.
    """
    if isinstance(results, Mapping):
        return [_official_entry_json(phrase, entry) for phrase, entry, _ in official_entries(results)]
    return [_typed_json(result) for result in _typed(results)]


def _typed_json(result: Item) -> dict[str, Any]:
    if isinstance(result, KeypointInstance):
        return {"phrase": result.phrase, "type": "keypoint", "instance_id": result.instance_id,
                "bbox": list(result.bbox.coords), "bbox_bins": list(result.bbox.bins),
                "keypoints": {name: None if xy is None else list(xy) for name, xy in result.keypoints.items()},
                "score": result.score}
    return {"phrase": result.phrase, "type": result.kind, "coords": list(result.coords),
            "bins": list(result.bins), "score": result.score}


def _official_entry_json(phrase: str, entry: dict[str, Any]) -> dict[str, Any]:
    if entry["type"] == "keypoint":
        keypoints = {name: None if xy == UNVISIBLE or xy is None else list(xy)
                     for name, xy in entry["keypoints"].items()}
        return {"phrase": phrase, "type": "keypoint", "instance_id": entry.get("instance_id"),
                "bbox": list(entry["bbox"]), "bbox_bins": None, "keypoints": keypoints, "score": None}
    return {"phrase": phrase, "type": entry["type"], "coords": flat_coords(entry), "bins": None, "score": None}


def detections_from_json(items: Iterable[Mapping[str, Any]]) -> list[Item]:
    """Typed results back from ``detections_to_json`` output written by rexedge (bins required)."""
    results: list[Item] = []
    for item in items:
        try:
            if item["type"] == "keypoint":
                box = Detection("box", item["phrase"], tuple(item["bbox_bins"]), tuple(item["bbox"]))
                keypoints = {name: None if xy is None else (xy[0], xy[1]) for name, xy in item["keypoints"].items()}
                results.append(KeypointInstance(item["phrase"], item["instance_id"], box, keypoints, item["score"]))
            elif item["type"] in GEOMETRY_KINDS:
                results.append(Detection(item["type"], item["phrase"], tuple(item["bins"]), tuple(item["coords"]),
                                         item["score"]))
            else:
                raise ResultFormatError(f"result JSON: unknown type {item['type']!r} in {dict(item)!r}")
        except (KeyError, TypeError) as e:
            raise ResultFormatError(
                f"result JSON: expected the fields written by detections_to_json, got {item!r} ({e!r})") from None
    return results


def flat_coords(entry: Mapping[str, Any]) -> list[float]:
    """x, y, x, y, ... of an official geometry entry (polygons come as [x, y] pairs)."""
    coords = entry["coords"]
    if entry["type"] == "polygon":
        return [float(v) for xy in coords for v in xy]
    return [float(v) for v in coords]
