"""Generated scenes of coloured shapes: the task the embedded default model is trained on.

The domain (issue 14): images of 160-640 px on each side, any aspect ratio; a plain light
background (each channel 130-255) with mild Gaussian noise (sigma 0-8); 1-4 solid shapes,
colour in {red, green, blue, yellow} (the shade jittered a little) x shape in {circle,
square, triangle}, named "red circle", "blue triangle", ...; each shape's bounding box a
square of 15-50% of the shorter side (a triangle points up and fills its box); any two
boxes overlap by at most 15% of the smaller one. A prompt asks for the categories present
plus up to two absent ones, which the answer marks ``None``.

Every scene is a pure function of its seed (``make_scene(seed)``), so training data,
probes and tests are reproducible without storing images. The answer is written in
Rex-Omni's output grammar with the project's own prompt and tokenizer code: groups in
prompt order, a present category's boxes top to bottom (then left to right).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.prompts import box_to_bins
from rexedge.runtime.request.tokenizer import Tokenizer

COLOURS = {
    "red": (210, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 65, 205),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)

SIDE_RANGE = (160, 640)
BACKGROUND_RANGE = (130, 255)
MAX_NOISE_SIGMA = 8.0
BOX_FRACTION = (0.15, 0.50)
MAX_OVERLAP = 0.15
MAX_SHAPES = 4
MAX_ABSENT = 2
SHADE_JITTER = 20
# The pixel budget the shapes model is trained and run with: 64 to 128 merged tokens of
# 28 x 28 px (224x224 .. ~317x317 for a square image), enough for boxes of >= 15% of a side.
MIN_PIXELS = 64 * 28 * 28
MAX_PIXELS = 128 * 28 * 28
# placements tried for each further shape before the scene keeps fewer shapes
PLACEMENT_TRIES = 50

Box = tuple[float, float, float, float]


class SceneError(RexEdgeError, ValueError):
    """Scene parameters outside the generator's domain."""


@dataclass(frozen=True)
class Shape:
    category: str
    box: Box  # (x0, y0, x1, y1) in pixels, pixel edges: a box of side s starting at x covers x..x+s


@dataclass(frozen=True, eq=False)
class Scene:
    """One generated image, its shapes, and the prompt's categories (present and absent, in prompt order)."""

    seed: int
    image: np.ndarray  # [H, W, 3] uint8, RGB
    shapes: tuple[Shape, ...]
    categories: tuple[str, ...]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.image.shape[1], self.image.shape[0]

    @property
    def absent(self) -> tuple[str, ...]:
        present = {shape.category for shape in self.shapes}
        return tuple(c for c in self.categories if c not in present)

    def answer_groups(self) -> list[tuple[str, list[tuple[int, int, int, int]] | None]]:
        """(category, its boxes as coordinate bins, or None when absent) in prompt order."""
        groups: list[tuple[str, list[tuple[int, int, int, int]] | None]] = []
        for category in self.categories:
            boxes = sorted((s.box for s in self.shapes if s.category == category), key=lambda b: (b[1], b[0]))
            groups.append((category, [box_to_bins(b, self.size) for b in boxes] or None))
        return groups

    def answer_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Token ids of the target answer, ending with <|im_end|>."""
        return answer_ids(self.answer_groups(), tokenizer)

    def answer_text(self, tokenizer: Tokenizer) -> str:
        return tokenizer.decode(self.answer_ids(tokenizer))


def answer_ids(groups: Sequence[tuple[str, Sequence[Sequence[int]] | None]], tokenizer: Tokenizer) -> list[int]:
    """Rex-Omni's detection answer for ``groups`` of (phrase, boxes in bins or None), in order."""
    ids = tokenizer.ids
    tokens: list[int] = []
    for index, (phrase, boxes) in enumerate(groups):
        if index:
            tokens += [ids.comma, ids.space]
        tokens += [ids.object_ref_start, *tokenizer.encode_text(phrase), ids.object_ref_end, ids.box_start]
        if boxes is None:
            tokens += list(ids.none)
        for number, box in enumerate(boxes or ()):
            tokens += ([ids.comma] if number else []) + [ids.coord_token(b) for b in box]
        tokens.append(ids.box_end)
    tokens.append(ids.im_end)
    return tokens


def overlap_fraction(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def make_scene(seed: int, max_shapes: int = MAX_SHAPES, min_shapes: int = 1) -> Scene:
    """The scene of ``seed``; ``max_shapes`` < 4 narrows the shape count (a training curriculum)."""
    if not 1 <= min_shapes <= max_shapes <= MAX_SHAPES:
        raise SceneError(f"need 1 <= min_shapes <= max_shapes <= {MAX_SHAPES}, got {min_shapes}, {max_shapes}")
    rng = np.random.default_rng([seed, 14])
    width, height = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2))
    background = rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, size=3)
    image = Image.new("RGB", (width, height), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)

    shapes: list[Shape] = []
    wanted = int(rng.integers(min_shapes, max_shapes + 1))
    shorter = min(width, height)
    for _ in range(wanted):
        for _ in range(PLACEMENT_TRIES):
            side = int(round(rng.uniform(*BOX_FRACTION) * shorter))
            x0 = int(rng.integers(0, width - side + 1))
            y0 = int(rng.integers(0, height - side + 1))
            box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
            if all(overlap_fraction(box, s.box) <= MAX_OVERLAP for s in shapes):
                break
        else:
            break  # the image is full enough: keep the shapes placed so far
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        fill = tuple(int(np.clip(c + rng.integers(-SHADE_JITTER, SHADE_JITTER + 1), 0, 255)) for c in COLOURS[colour])
        _draw_shape(draw, shape, x0, y0, side, fill)
        shapes.append(Shape(f"{colour} {shape}", box))

    pixels = np.asarray(image, dtype=np.float32)
    sigma = rng.uniform(0.0, MAX_NOISE_SIGMA)
    pixels = np.clip(np.rint(pixels + rng.normal(0.0, sigma, size=pixels.shape)), 0, 255).astype(np.uint8)

    present = list(dict.fromkeys(s.category for s in shapes))
    others = [c for c in CATEGORIES if c not in present]
    absent = list(rng.choice(others, size=int(rng.integers(0, MAX_ABSENT + 1)), replace=False))
    categories = [str(c) for c in present + absent]
    rng.shuffle(categories)
    return Scene(seed, pixels, tuple(shapes), tuple(categories))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int, fill: tuple[int, ...]) -> None:
    # Pillow's boxes include their last pixel: a shape of `side` pixels ends at x0 + side - 1.
    x1, y1 = x0 + side - 1, y0 + side - 1
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
