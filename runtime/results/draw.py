"""Results drawn onto the image with Pillow: boxes, points, polygons, keypoints, labels.

Each phrase keeps its colour from image to image (picked from a fixed palette by a hash
of the phrase), and two phrases in one image never share a colour while the palette
lasts (a collision moves to the next free colour, in order of first appearance).
Labels use Pillow's default font, which every Pillow installation has.
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Iterable

from PIL import Image, ImageDraw, ImageFont

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.results.detections import UNVISIBLE, Items, flat_coords, official_entries

Colour = tuple[int, int, int]


def _palette(size: int) -> tuple[Colour, ...]:
    # golden-ratio hue steps keep neighbouring slots far apart; two brightness levels double the count
    colours = []
    for i in range(size):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0 if i % 2 == 0 else 0.75)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return tuple(colours)


PALETTE = _palette(24)


class DrawInputError(RexEdgeError):
    """draw_detections was given something that is not a PIL image, or a width below 1."""


def phrase_colours(phrases: Iterable[str]) -> dict[str, Colour]:
    """A colour per distinct phrase: stable across images, distinct within one (up to len(PALETTE))."""
    colours: dict[str, Colour] = {}
    taken: set[int] = set()
    for phrase in phrases:
        if phrase in colours:
            continue
        slot = zlib.crc32(phrase.encode("utf-8")) % len(PALETTE)
        if len(taken) < len(PALETTE):
            while slot in taken:
                slot = (slot + 1) % len(PALETTE)
        taken.add(slot)
        colours[phrase] = PALETTE[slot]
    return colours


def draw_detections(image: Image.Image, results: Items, line_width: int | None = None,
                    point_radius: int | None = None, show_labels: bool = True,
                    font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None) -> Image.Image:
    """A new RGB image with the results drawn on (the input image is not modified).

    results: typed results or the official dictionary, in ORIGINAL image pixels. Labels
    read "phrase" or "phrase 0.87" when the result has a score.
    """
    if not isinstance(image, Image.Image):
        raise DrawInputError(f"image: expected a PIL.Image.Image, got {type(image).__name__}")
    entries = official_entries(results)
    canvas = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(canvas)
    if line_width is None:
        line_width = max(2, round(min(canvas.size) / 250))
    if point_radius is None:
        point_radius = 2 * line_width
    if line_width < 1 or point_radius < 1:
        raise DrawInputError(f"line_width, point_radius: expected >= 1, got {line_width}, {point_radius}")
    font = font or ImageFont.load_default()
    colours = phrase_colours(phrase for phrase, _, _ in entries)
    for phrase, entry, score in entries:
        colour = colours[phrase]
        if entry["type"] == "keypoint":
            anchor = _draw_box(draw, [float(v) for v in entry["bbox"]], colour, line_width)
            for xy in entry["keypoints"].values():
                if xy is not None and xy != UNVISIBLE:
                    _draw_point(draw, float(xy[0]), float(xy[1]), colour, point_radius)
        elif entry["type"] == "box":
            anchor = _draw_box(draw, flat_coords(entry), colour, line_width)
        elif entry["type"] == "point":
            x, y = flat_coords(entry)
            _draw_point(draw, x, y, colour, point_radius)
            anchor = (x + point_radius, y + point_radius)
        else:
            coords = flat_coords(entry)
            draw.polygon(coords, outline=colour, width=line_width)
            anchor = (min(coords[0::2]), min(coords[1::2]))
        if show_labels:
            label = phrase if score is None else f"{phrase} {score:.2f}"
            _draw_label(draw, anchor, label, colour, font, canvas.size)
    return canvas


def _draw_box(draw: ImageDraw.ImageDraw, coords: list[float], colour: Colour, width: int) -> tuple[float, float]:
    x0, x1 = sorted(coords[0::2])
    y0, y1 = sorted(coords[1::2])
    draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
    return x0, y0


def _draw_point(draw: ImageDraw.ImageDraw, x: float, y: float, colour: Colour, radius: int) -> None:
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)


def _draw_label(draw: ImageDraw.ImageDraw, anchor: tuple[float, float], label: str, colour: Colour,
                font: ImageFont.ImageFont | ImageFont.FreeTypeFont, image_size: tuple[int, int]) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    w, h = right - left + 4, bottom - top + 4
    # above the shape when there is room, else just inside it; never past the right edge
    x = min(max(anchor[0], 0), max(image_size[0] - w, 0))
    y = anchor[1] - h if anchor[1] - h >= 0 else max(anchor[1], 0)
    draw.rectangle((x, y, x + w, y + h), fill=colour)
    # dark text on light colours, light text on dark ones (ITU-R BT.601 luma)
    luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((x + 2 - left, y + 2 - top), label, fill=(0, 0, 0) if luma > 140 else (255, 255, 255), font=font)
