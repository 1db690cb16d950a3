"""Benchmark scenarios: an image size, a task and a forced response.

So that every backend decodes the same tokens from random weights, a scenario fixes the
answer: ``num_boxes`` boxes (or points) spread over ``num_categories`` categories, in the
task's output format (docs/model.md, "Output grammar"), built from the model's own tokenizer.
The harness feeds it token by token through the real decode loop (``rexedge.bench.scripted``),
so the real grammar yields the real step kinds (free phrase text, coordinates, choices,
forced appends) and the real head is asked at every step.

Named scenarios are in ``SCENARIOS``; any other is written ``WxH:N/K[:task][:exact]``, e.g.
``640x480:12/3`` (12 boxes over 3 categories) or ``448x448:8/2:pointing:exact``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.tokenizer import Tokenizer, TokenIds

# geometry of each task the benchmark can force, in coordinates per item
COORDS_PER_ITEM = {"detection": 4, "pointing": 2}
DECODING_MODES = ("structured", "exact")
# COCO names; a scenario takes the first K
CATEGORY_NAMES = (
    "person", "car", "cup", "dog", "traffic light", "chair", "bottle", "bicycle", "door handle", "laptop",
    "potted plant", "cell phone",
)  # fmt: skip


class BenchError(RexEdgeError, ValueError):
    """A benchmark that cannot run as asked: unknown scenario or model, a backend the model cannot feed."""


@dataclass(frozen=True)
class Scenario:
    name: str
    image_size: tuple[int, int]          # (width, height) of the input image
    num_boxes: int
    num_categories: int
    task: str = "detection"
    decoding: str = "structured"

    def __post_init__(self) -> None:
        if self.task not in COORDS_PER_ITEM:
            raise BenchError(f"scenario {self.name}: task {self.task!r}, expected one of {sorted(COORDS_PER_ITEM)}")
        if self.decoding not in DECODING_MODES:
            raise BenchError(f"scenario {self.name}: decoding {self.decoding!r}, expected one of {DECODING_MODES}")
        if not 1 <= self.num_categories <= len(CATEGORY_NAMES):
            raise BenchError(f"scenario {self.name}: categories must be 1..{len(CATEGORY_NAMES)}, "
                             f"got {self.num_categories}")
        if self.num_boxes < self.num_categories:
            raise BenchError(f"scenario {self.name}: {self.num_boxes} boxes cannot cover {self.num_categories} "
                             f"categories (need at least one box each)")
        if min(self.image_size) < 28:
            raise BenchError(f"scenario {self.name}: image size {self.image_size}, each side must be >= 28 px")

    @property
    def categories(self) -> list[str]:
        return list(CATEGORY_NAMES[: self.num_categories])


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("det-448", (448, 448), 20, 4),
    Scenario("det-448-exact", (448, 448), 20, 4, decoding="exact"),
    Scenario("det-896", (896, 896), 40, 5),
    # 1440x810 resizes to 1428x812: 1,479 image tokens (docs/model.md)
    Scenario("det-1428x812", (1428, 812), 60, 6),
    Scenario("point-448", (448, 448), 20, 4, task="pointing"),
    # the real size on a CPU (issue 18): a short structured detection answer (31 tokens), so that a 3B model's
    # rounds against llama.cpp fit a shared 2-core machine; -exact: every token over the full vocabulary
    Scenario("rex-omni-3b", (448, 448), 4, 2),
    Scenario("rex-omni-3b-exact", (448, 448), 4, 2, decoding="exact"),
)}
DEFAULT_SCENARIOS = ("det-448", "det-448-exact", "det-896", "det-1428x812", "point-448")


def parse_scenario(text: str) -> Scenario:
    """A named scenario, or ``WxH:N/K[:task][:exact]`` (see the module docstring)."""
    if text in SCENARIOS:
        return SCENARIOS[text]
    parts = text.split(":")
    try:
        width, height = (int(v) for v in parts[0].lower().split("x"))
        boxes, categories = (int(v) for v in parts[1].split("/"))
    except (ValueError, IndexError):
        raise BenchError(f"scenario {text!r}: expected one of {sorted(SCENARIOS)} or WxH:N/K[:task][:exact] "
                         f"(e.g. 640x480:12/3)") from None
    task, decoding = "detection", "structured"
    for extra in parts[2:]:
        if extra in DECODING_MODES:
            decoding = extra
        else:
            task = extra
    return Scenario(text, (width, height), boxes, categories, task=task, decoding=decoding)


def synthetic_image(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 RGB image of smooth gradients and noise (content does not change the cost)."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 21, size=base.shape), 0, 255).astype(np.uint8)


def forced_response(scenario: Scenario, tokenizer: Tokenizer, seed: int = 0) -> list[int]:
    """Token ids of a well-formed answer: ``num_boxes`` distinct items over the categories, then <|im_end|>.

    Boxes are split as evenly as the count allows; each box has x0 < x1 and y0 < y1, no box
    repeats and none is all zeros, so the loop's guards never stop the answer early.
    """
    ids: TokenIds = tokenizer.ids
    rng = np.random.default_rng(seed)
    per_item = COORDS_PER_ITEM[scenario.task]
    counts = np.full(scenario.num_categories, scenario.num_boxes // scenario.num_categories)
    counts[: scenario.num_boxes % scenario.num_categories] += 1
    seen: set[tuple[int, ...]] = set()
    tokens: list[int] = []
    for group, (category, count) in enumerate(zip(scenario.categories, counts)):
        if group:
            tokens += [ids.comma, ids.space]
        tokens += [ids.object_ref_start, *tokenizer.encode_text(category), ids.object_ref_end, ids.box_start]
        for item in range(count):
            bins = _distinct_item(rng, per_item, seen)
            tokens += ([ids.comma] if item else []) + [ids.coord_token(b) for b in bins]
        tokens.append(ids.box_end)
    tokens.append(ids.im_end)
    return tokens


def _distinct_item(rng: np.random.Generator, per_item: int, seen: set[tuple[int, ...]]) -> tuple[int, ...]:
    while True:
        if per_item == 4:
            x0, x1 = sorted(rng.choice(1000, size=2, replace=False))
            y0, y1 = sorted(rng.choice(1000, size=2, replace=False))
            bins = (int(x0), int(y0), int(x1), int(y1))
        else:
            bins = tuple(int(v) for v in rng.integers(1, 1000, size=per_item))
        if bins not in seen:
            seen.add(bins)
            return bins
