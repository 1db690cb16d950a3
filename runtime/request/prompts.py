"""Rex-Omni's task prompts and chat template, and the ``rexedge prompt`` command.

The prompt texts are the ones the model was trained with, verbatim (including the doubled
quote in gui_grounding). Categories are user text: they are always encoded as plain text,
so a category that spells "<|im_end|>" or "<5>" cannot inject a special or coordinate
token. The only coordinate tokens a prompt may hold are the visual-prompt boxes, which
the runtime produces itself (``TaskPrompt.pieces`` keeps them apart from the text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Sequence, Union

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.tokenizer import NUM_COORDS, TokenIds, Tokenizer, coord_text

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"


@dataclass(frozen=True)
class TaskSpec:
    """One task: its prompt template and the geometry its answer holds."""

    name: str
    template: str
    geometry: str  # "box" | "point" | "polygon" | "keypoint" (a box and named points per instance)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "detection", "Detect {categories}. Output the bounding box coordinates in [x0, y0, x1, y1] format.", "box"
        ),
        TaskSpec("pointing", "Point to {categories}.", "point"),
        TaskSpec(
            "visual_prompting",
            "Given reference boxes {visual_prompt} indicating one or more objects, "
            "find all similar objects in the image and output their bounding boxes.",
            "box",
        ),
        TaskSpec(
            "keypoint",
            "Can you detect each {categories} in the image using a [x0, y0, x1, y1] box format, "
            "and then provide the coordinates of its {keypoints} as [x0, y0]? Output the answer in JSON format.",
            "keypoint",
        ),
        TaskSpec("ocr_box", "Detect all {categories} and recognize them.", "box"),
        TaskSpec(
            "ocr_polygon",
            "Can you detect all {categories} in this image in polygon format like "
            "[x0, y0, x1, y1, x2, y2 ...] and then recognize them?",
            "polygon",
        ),
        # the doubled quote is in the original prompt and the model was trained with it
        TaskSpec("gui_grounding", 'Detect element "{categories}"" in the image.', "box"),
        TaskSpec("gui_pointing", 'Point to element "{categories}".', "point"),
    )
}

KEYPOINT_NAMES: dict[str, tuple[str, ...]] = {
    # the 17 COCO keypoints
    "person": (
        "nose", "left eye", "right eye", "left ear", "right ear",
        "left shoulder", "right shoulder", "left elbow", "right elbow", "left wrist", "right wrist",
        "left hip", "right hip", "left knee", "right knee", "left ankle", "right ankle",
    ),
    "animal": (
        "left eye", "right eye", "nose", "neck", "root of tail",
        "left shoulder", "left elbow", "left front paw", "right shoulder", "right elbow", "right front paw",
        "left hip", "left knee", "left back paw", "right hip", "right knee", "right back paw",
    ),
}

# A prompt piece is text, or (an int) the bin of a coordinate token made by the runtime.
PromptPiece = Union[str, int]


class PromptError(RexEdgeError, ValueError):
    """A task, categories, keypoint type or visual prompt that cannot make a prompt."""


@dataclass(frozen=True)
class TaskPrompt:
    """The user turn of one request: text pieces and runtime-made coordinate bins, in order."""

    task: str
    pieces: tuple[PromptPiece, ...]

    @property
    def text(self) -> str:
        return "".join(coord_text(p) if isinstance(p, int) else p for p in self.pieces)


def build_task_prompt(
    task: str,
    categories: str | Sequence[str] | None = None,
    keypoint_type: str | None = None,
    visual_prompt_boxes: Sequence[Sequence[float]] | None = None,
    image_size: tuple[int, int] | None = None,
) -> TaskPrompt:
    """The prompt for ``task``, keeping visual-prompt coordinates apart from the text.

    Arguments a task does not use are ignored, as in the reference (e.g. categories for
    visual_prompting). ``image_size`` is the original (width, height); visual_prompting
    needs it to turn pixel boxes into bins.
    """
    spec = task_spec(task)
    if spec.name == "visual_prompting":
        if image_size is None:
            raise PromptError("visual_prompting needs image_size=(width, height) to turn boxes into bins")
        return TaskPrompt(spec.name, _visual_prompt_pieces(spec.template, visual_prompt_boxes, image_size))
    fields = {"categories": ", ".join(_check_categories(categories, spec.name))}
    if spec.name == "keypoint":
        fields["keypoints"] = ", ".join(keypoint_names(keypoint_type))
    return TaskPrompt(spec.name, (spec.template.format(**fields),))


def build_prompt(
    task: str,
    categories: str | Sequence[str] | None = None,
    keypoint_type: str | None = None,
    visual_prompt_boxes: Sequence[Sequence[float]] | None = None,
    image_size: tuple[int, int] | None = None,
) -> str:
    """The prompt text for ``task`` (the user turn, as the reference writes it)."""
    return build_task_prompt(task, categories, keypoint_type, visual_prompt_boxes, image_size).text


def task_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise PromptError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return TASKS[task]


def keypoint_names(keypoint_type: str | None) -> tuple[str, ...]:
    if keypoint_type is None:
        raise PromptError(f"the keypoint task needs keypoint_type, one of {', '.join(KEYPOINT_NAMES)}")
    if keypoint_type not in KEYPOINT_NAMES:
        raise PromptError(f"unknown keypoint_type {keypoint_type!r}; expected one of {', '.join(KEYPOINT_NAMES)}")
    return KEYPOINT_NAMES[keypoint_type]


def box_to_bins(box: Sequence[float], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) in an image of (width, height) -> bins int(clamp(v / side, 0, 1) * 999)."""
    width, height = image_size
    top = NUM_COORDS - 1
    return tuple(int(min(max(v / side, 0.0), 1.0) * top) for v, side in zip(box, (width, height, width, height)))


def render_chat(task_prompt_text: str, num_image_tokens: int, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The whole model input as text: Rex-Omni's chat template around one image and the prompt."""
    return (
        f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|>{'<|image_pad|>' * num_image_tokens}<|vision_end|>{task_prompt_text}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def encode_prompt(
    tokenizer: Tokenizer,
    ids: TokenIds,
    task_prompt: TaskPrompt | str,
    num_image_tokens: int,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[int]:
    """Token ids of the chat template (``render_chat``) around one image and the prompt.

    Template specials come from ``ids``; every text part (the system prompt, the prompt
    text, categories included) is encoded as plain text. A ``TaskPrompt`` contributes its
    coordinate bins as coordinate tokens; a plain ``str`` prompt is all text.
    """
    if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens <= 0:
        raise PromptError(f"num_image_tokens must be a positive integer, got {num_image_tokens!r}")
    pieces = task_prompt.pieces if isinstance(task_prompt, TaskPrompt) else (task_prompt,)
    text = tokenizer.encode_text
    prompt_ids: list[int] = []
    for piece in pieces:
        prompt_ids += [ids.coord_token(piece)] if isinstance(piece, int) else text(piece)
    return [
        ids.im_start, *text(f"system\n{system_prompt}"), ids.im_end, *text("\n"),
        ids.im_start, *text("user\n"),
        ids.vision_start, *[ids.image_pad] * num_image_tokens, ids.vision_end,
        *prompt_ids, ids.im_end, *text("\n"),
        ids.im_start, *text("assistant\n"),
    ]  # fmt: skip


# helpers -------------------------------------------------------------------


def _check_categories(categories: str | Sequence[str] | None, task: str) -> list[str]:
    if isinstance(categories, str):
        listed = [categories]
    elif isinstance(categories, Sequence):
        listed = list(categories)
    elif categories is None:
        listed = []
    else:
        raise PromptError(f"categories must be a string or a list of strings, got {type(categories).__name__}")
    if not listed:
        raise PromptError(f"task {task!r} needs categories (what to look for), e.g. ['person', 'cup']")
    for category in listed:
        if not isinstance(category, str) or not category.strip():
            raise PromptError(f"categories must be non-empty strings, got {category!r} in {listed!r}")
    return listed


def _visual_prompt_pieces(
    template: str, boxes: Sequence[Sequence[float]] | None, image_size: tuple[int, int]
) -> tuple[PromptPiece, ...]:
    width, height = _check_image_size(image_size)
    if boxes is None or len(boxes) == 0:
        raise PromptError("visual_prompting needs visual_prompt_boxes: [[x0, y0, x1, y1], ...] in pixels")
    all_bins = [box_to_bins(_check_box(box, index, width, height), (width, height)) for index, box in enumerate(boxes)]
    # The reference writes json.dumps({"object_1": ["<x0><y0><x1><y1>", ...]}); the same
    # text here, with the bins kept as coordinate pieces.
    head, tail = template.split("{visual_prompt}")
    pieces: list[PromptPiece] = [head + '{"object_1": ["']
    for index, bins in enumerate(all_bins):
        if index:
            pieces.append('", "')
        pieces.extend(bins)
    pieces.append('"]}' + tail)
    return tuple(pieces)


def _check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise PromptError(f"image_size must be (width, height), got {image_size!r}") from None
    for name, side in (("width", width), ("height", height)):
        if isinstance(side, bool) or not isinstance(side, int) or side <= 0:
            raise PromptError(f"image_size {name} must be a positive integer, got {side!r}")
    return width, height


def _check_box(box: Sequence[float], index: int, width: int, height: int) -> tuple[float, float, float, float]:
    try:
        values = tuple(box)
    except TypeError:
        values = ()
    numbers = all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if len(values) != 4 or not numbers:
        raise PromptError(f"visual prompt box {index} must be 4 finite numbers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = values
    if x1 < x0 or y1 < y0:
        raise PromptError(
            f"visual prompt box {index} {list(values)} has x1 < x0 or y1 < y0 (expected [x0, y0, x1, y1])"
        )
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise PromptError(f"visual prompt box {index} {list(values)} lies outside the {width}x{height} (WxH) image")
    return x0, y0, x1, y1
