"""Model text -> results, with exactly the official Rex-Omni parser's behaviour.

``parse_prediction`` returns the dictionary the official package puts in
``extracted_predictions``; ``parse_results`` returns the same answer as typed results.
The behaviour, which users of the official package rely on:

Box, point and polygon tasks (every task but keypoint)
- Only the text before the first <|im_end|> counts. When it does not end with
  <|box_end|>, one is appended, so a group cut off inside its payload still counts.
- A group is <|object_ref_start|> phrase <|object_ref_end|> [whitespace] <|box_start|>
  payload <|box_end|>, taking the first <|box_end|> on the same line. The phrase is any
  non-empty text without "<", stripped of surrounding whitespace. A group that does not
  fit is skipped, and text between groups is ignored.
- The payload is split at every ","; each piece's <digits> tokens make one geometry by
  count: 2 a point, 4 a box, an even number >= 6 a polygon; other counts (0 for "None", 1,
  3, 5, ...) give nothing. The kind comes from the count, not from the task. A box cut to
  two coordinates by truncation therefore becomes a point, as in the official parser.
- Every phrase seen gets a key (with [] when nothing parsed, e.g. "None"); a repeated
  phrase extends its list; keys follow first appearance.
- Pixels: x = bin / 999 * width, y = bin / 999 * height of the ORIGINAL image; bins are
  not clamped (the model only emits 0..999).

Keypoint task
- The JSON is the first ```json ... ``` block; without one, the text from the first "{"
  to the last "}". Invalid or truncated JSON gives {}.
- Each instance needs a "bbox" string with exactly 4 coordinate tokens and a
  "keypoints" object, or it is skipped. A keypoint that is "unvisible", null, not a
  string, or not exactly 2 coordinate tokens is "unvisible".
- The category is the instance id's leading ASCII letters and underscores ("person1" ->
  "person"), or "keypoint_instance" when there are none.

Where the official parser raises instead of returning (JSON that is not an object, an
instance or keypoints that are not objects, a coordinate too large for a float), this
parser skips the offending part and goes on.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Iterator

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.prompts import TASKS
from rexedge.runtime.results.detections import Detection, KeypointInstance, Item, bins_to_pixels, to_official

_IM_END = "<|im_end|>"
_BOX_END = "<|box_end|>"
_GROUP = re.compile(
    re.escape("<|object_ref_start|>") + r"(?P<phrase>[^<]+)" + re.escape("<|object_ref_end|>")
    + r"\s*" + re.escape("<|box_start|>") + r"(?P<payload>.*?)" + re.escape(_BOX_END))
_BIN = re.compile(r"<(\d+)>")
_JSON_FENCE = re.compile(r"```json\s*(.*?)\s*```", re.DOTALL)
_CATEGORY_PREFIX = re.compile(r"[A-Za-z_]+")
_UNNAMED_CATEGORY = "keypoint_instance"


class ParseInputError(RexEdgeError):
    """parse_prediction was called with a bad argument (not with bad model text: that never raises)."""


def parse_prediction(text: str, width: int, height: int, task: str) -> dict:
    """The official Rex-Omni result dictionary for the model's text (see the module docstring).

    width, height: the ORIGINAL image size in pixels. task: a task name of ``prompts.TASKS``.
    """
    _check_arguments(text, width, height, task)
    if TASKS[task].geometry == "keypoint":
        return to_official(_keypoint_instances(text, int(width), int(height)))
    official: dict[str, list[dict]] = {}
    for phrase, detections in _phrase_groups(text, int(width), int(height)):
        official.setdefault(phrase, []).extend(d.to_official() for d in detections)
    return official


def parse_results(text: str, width: int, height: int, task: str) -> list[Item]:
    """The same answer as ``parse_prediction``, typed: Detections, or KeypointInstances for keypoint.

    Phrases that parsed to nothing (e.g. "None") have no typed result; ``parse_prediction``
    lists them with an empty list.
    """
    _check_arguments(text, width, height, task)
    if TASKS[task].geometry == "keypoint":
        return list(_keypoint_instances(text, int(width), int(height)))
    return [d for _, detections in _phrase_groups(text, int(width), int(height)) for d in detections]


def _check_arguments(text: str, width: int, height: int, task: str) -> None:
    if not isinstance(text, str):
        raise ParseInputError(f"text: expected the model's output as str, got {type(text).__name__}")
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ParseInputError(f"{name}: expected the original image size as a positive int, got {value!r}")
    if task not in TASKS:
        raise ParseInputError(f"task: expected one of {', '.join(TASKS)}; got {task!r}")


def _phrase_groups(text: str, width: int, height: int) -> Iterator[tuple[str, list[Detection]]]:
    body = text.split(_IM_END, 1)[0]
    if not body.endswith(_BOX_END):
        body += _BOX_END
    for match in _GROUP.finditer(body):
        phrase = match["phrase"].strip()
        detections = []
        for piece in match["payload"].split(","):
            found = _bins(_BIN.findall(piece), width, height)
            if found is None:
                continue
            kind = _kind_of(len(found[0]))
            if kind is not None:
                detections.append(Detection(kind, phrase, *found))
        yield phrase, detections


def _kind_of(num_coords: int) -> str | None:
    if num_coords == 2:
        return "point"
    if num_coords == 4:
        return "box"
    if num_coords >= 6 and num_coords % 2 == 0:
        return "polygon"
    return None


def _bins(digits: list[str], width: int, height: int) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """Bins and pixels, or None for a number Python cannot convert (thousands of digits)."""
    try:
        bins = tuple(int(d) for d in digits)
        return bins, bins_to_pixels(bins, width, height)
    except (ValueError, OverflowError):
        return None


def _keypoint_instances(text: str, width: int, height: int) -> Iterator[KeypointInstance]:
    fenced = _JSON_FENCE.search(text)
    if fenced is not None:
        json_text = fenced.group(1)
    else:
        start, end = text.find("{"), text.rfind("}")
        if start == -1 or end == -1:
            return
        json_text = text[start:end + 1]
    try:
        instances = json.loads(json_text)
    except (ValueError, RecursionError):
        return
    if not isinstance(instances, dict):
        return
    for instance_id, instance in instances.items():
        if not isinstance(instance, dict) or "bbox" not in instance or "keypoints" not in instance:
            continue
        box, keypoints = instance["bbox"], instance["keypoints"]
        if not isinstance(box, str) or not isinstance(keypoints, dict):
            continue
        box_bins = _BIN.findall(box)
        converted = _bins(box_bins, width, height) if len(box_bins) == 4 else None
        if converted is None:
            continue
        prefix = _CATEGORY_PREFIX.match(instance_id)
        category = prefix.group(0) if prefix else _UNNAMED_CATEGORY
        yield KeypointInstance(
            phrase=category, instance_id=instance_id, bbox=Detection("box", category, *converted),
            keypoints={name: _keypoint_xy(value, width, height) for name, value in keypoints.items()})


def _keypoint_xy(value: object, width: int, height: int) -> tuple[float, float] | None:
    if not isinstance(value, str):
        return None
    digits = _BIN.findall(value)
    converted = _bins(digits, width, height) if len(digits) == 2 else None
    return None if converted is None else (converted[1][0], converted[1][1])
