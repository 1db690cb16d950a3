"""Request options as written on a command line (shared by detect, prompt, video and batch)."""

from __future__ import annotations

from rexedge.runtime.request.prompts import PromptError


def parse_categories(text: str) -> list[str]:
    categories = [c.strip() for c in text.split(",")]
    if not all(categories):
        raise PromptError(f"--categories must be comma-separated non-empty names, e.g. 'cup,door handle'; got {text!r}")
    return categories


def parse_boxes(text: str) -> list[list[float]]:
    """Boxes written on a command line, 'x0,y0,x1,y1;x0,y0,x1,y1' (pixels) -> [[x0, y0, x1, y1], ...]."""
    boxes = []
    for part in text.split(";"):
        try:
            box = [float(v) for v in part.split(",")]
        except ValueError:
            box = []
        if len(box) != 4:
            raise PromptError(f"--visual-prompt-boxes must be 'x0,y0,x1,y1;x0,y0,x1,y1' in pixels; got {text!r}")
        boxes.append(box)
    return boxes
