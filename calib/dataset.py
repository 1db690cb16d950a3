"""The calibration set: the user's images with a mix of task prompts, turned into graph inputs.

A calibration sample is one image with one task prompt. The vision graph is calibrated
on the distinct images; the decoder on what it really sees at inference: the prompt's
prefill (image embeddings from the FP32 vision graph spliced into the prompt
embeddings, M-RoPE positions) and then a few decode steps in structured mode (the
output grammar forces the tokens a real answer starts with, the head chooses the
rest), every call with its KV cache. The feeds come from
:class:`rexedge.calib.graph_backend.GraphBackend` running the FP32 bundle, one sample
at a time, so memory holds one sample's feeds, never the whole set.

An image that cannot be read is recorded in ``failures`` and skipped; the run goes on.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from rexedge.calib.graph_backend import GraphBackend
from rexedge.runtime.backends.graph_session import Feeds
from rexedge.runtime.backends.vision_feeds import vision_feeds
from rexedge.runtime.decode.grammar import make_grammar
from rexedge.runtime.decode.head import Sampling
from rexedge.runtime.decode.loop import DecodeLoop, Limits
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.encode import encode_task
from rexedge.runtime.request.preprocess import MAX_PIXELS, MIN_PIXELS, PreprocessedImage, preprocess
from rexedge.runtime.request.prompts import TASKS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# What users ask for, per task; each sample draws one to three of them (seeded).
CATEGORY_POOLS: dict[str, tuple[str, ...]] = {
    "detection": ("person", "car", "dog", "cat", "cup", "chair", "bottle", "bicycle", "traffic light",
                  "door handle", "laptop", "potted plant", "backpack", "bird", "truck"),
    "ocr": ("text", "word", "text line"),
    "gui": ("search button", "close icon", "settings menu", "login field", "back arrow", "play button"),
}
POOL_OF_TASK = {"detection": "detection", "pointing": "detection", "ocr_box": "ocr", "ocr_polygon": "ocr",
                "gui_grounding": "gui", "gui_pointing": "gui"}
KEYPOINT_SUBJECTS = (("person", "person"), ("cat", "animal"), ("dog", "animal"))


class CalibrationError(RexEdgeError, ValueError):
    """A calibration set that cannot be built: no images, unknown task, bad count."""


@dataclass(frozen=True)
class CalibrationSample:
    """One image and one task prompt; visual-prompt boxes are fractions of the image (x0, y0, x1, y1)."""

    image: Path
    task: str
    categories: tuple[str, ...] = ()
    keypoint_type: str | None = None
    box_fractions: tuple[tuple[float, float, float, float], ...] = ()


@dataclass
class Request:
    """Everything the decode loop takes for one sample."""

    image: PreprocessedImage
    prompt_ids: np.ndarray
    positions: np.ndarray
    rope_delta: int
    grammar: Any


def find_images(directory: str | Path) -> list[Path]:
    """Image files (by suffix) directly in ``directory``, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CalibrationError(f"--images {directory}: not a directory")
    images = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CalibrationError(f"--images {directory}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return images


def check_tasks(tasks: Sequence[str] | None) -> tuple[str, ...]:
    """The tasks to mix (all of them by default), each checked against the known tasks."""
    if tasks is None:
        return tuple(TASKS)
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise CalibrationError(f"--tasks {', '.join(tasks) or '(none)'}: expected some of {', '.join(TASKS)}")
    return tasks


def plan_samples(images: Sequence[Path], tasks: Sequence[str], num: int, seed: int = 0) -> list[CalibrationSample]:
    """``num`` samples: images in a seeded order (each used before any repeats), tasks in turn.

    Task i % len(tasks) with the images shuffled each round, so with more samples than
    images every image is seen with several tasks.
    """
    if num < 1:
        raise CalibrationError(f"--num {num}: expected at least 1 calibration sample")
    tasks = check_tasks(tasks)
    rng = np.random.default_rng(seed)
    samples = []
    order: list[int] = []
    for i in range(num):
        if not order:
            order = list(rng.permutation(len(images)))
        samples.append(_sample(images[order.pop()], tasks[i % len(tasks)], rng))
    return samples


def _sample(image: Path, task: str, rng: np.random.Generator) -> CalibrationSample:
    if task == "keypoint":
        subject, kind = KEYPOINT_SUBJECTS[rng.integers(len(KEYPOINT_SUBJECTS))]
        return CalibrationSample(image, task, (subject,), keypoint_type=kind)
    if task == "visual_prompting":
        boxes = []
        for _ in range(int(rng.integers(1, 3))):
            x0, y0 = rng.uniform(0.0, 0.7, size=2)
            w, h = rng.uniform(0.1, 0.3, size=2)
            boxes.append((float(x0), float(y0), float(x0 + w), float(y0 + h)))
        return CalibrationSample(image, task, box_fractions=tuple(boxes))
    pool = CATEGORY_POOLS[POOL_OF_TASK[task]]
    picked = rng.choice(len(pool), size=min(int(rng.integers(1, 4)), len(pool)), replace=False)
    return CalibrationSample(image, task, tuple(pool[j] for j in sorted(picked)))


def build_request(backend: Any, sample: CalibrationSample, image: PreprocessedImage) -> Request:
    """Prompt ids, M-RoPE positions and the grammar for ``sample`` on an already preprocessed image."""
    ids = backend.tokenizer.ids
    width, height = image.image_size
    boxes = [(x0 * width, y0 * height, x1 * width, y1 * height) for x0, y0, x1, y1 in sample.box_fractions] or None
    _, prompt_ids, positions, rope_delta = encode_task(backend.tokenizer, image, sample.task,
                                                       list(sample.categories) or None, sample.keypoint_type, boxes)
    grammar = make_grammar(sample.task, ids, image.image_size, decode=backend.tokenizer.decode)
    return Request(image, prompt_ids, positions, rope_delta, grammar)


class _Reader(CalibrationDataReader):
    """ONNX Runtime pulls feeds with get_next(); ours come from a generator, one sample at a time."""

    def __init__(self, backend: GraphBackend, samples: Sequence[CalibrationSample], min_pixels: int,
                 max_pixels: int, progress: Any = None) -> None:
        self.backend, self.samples = backend, list(samples)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.progress = progress
        self.failures: dict[str, str] = {}
        self.feeds_given = 0
        self._items = self._generate()

    @abstractmethod
    def _generate(self) -> Iterator[Feeds]: ...

    def _preprocess(self, path: Path) -> PreprocessedImage | None:
        if str(path) in self.failures:
            return None
        try:
            return preprocess(path, self.min_pixels, self.max_pixels, cfg=self.backend.config)
        except RexEdgeError as e:
            self.failures[str(path)] = str(e)
            return None

    def get_next(self) -> Feeds | None:
        feeds = next(self._items, None)
        if feeds is not None:
            self.feeds_given += 1
        elif self.feeds_given == 0:
            # fail here, clearly, rather than with ONNX Runtime's "No data is collected"
            failed = "; ".join(f"{k}: {v}" for k, v in list(self.failures.items())[:3])
            raise CalibrationError(f"calibration of the {self.graph} graph: no image could be read ({failed})")
        return feeds


class VisionReader(_Reader):
    """The vision graph's inputs for each distinct image of the samples."""

    graph = "vision"

    def _generate(self) -> Iterator[Feeds]:
        for path in dict.fromkeys(s.image for s in self.samples):
            image = self._preprocess(path)
            if self.progress is not None:
                self.progress.update()
            if image is not None:
                yield vision_feeds(self.backend.bundle.vision.input_names(), image)


class DecoderReader(_Reader):
    """The decoder's inputs of each sample: the prefill, then up to ``steps`` decode calls."""

    graph = "decoder"

    def __init__(self, backend: GraphBackend, samples: Sequence[CalibrationSample], min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, steps: int = 8, progress: Any = None) -> None:
        if steps < 0:
            raise CalibrationError(f"--steps {steps}: expected >= 0 decode steps per sample")
        super().__init__(backend, samples, min_pixels, max_pixels, progress)
        self.steps = steps
        self._embeds: dict[Path, np.ndarray] = {}

    def _generate(self) -> Iterator[Feeds]:
        recorded: list[Feeds] = []
        backend = self.backend.with_hooks(decode_reserve=max(self.steps, 1), on_decoder=recorded.append)
        # the prefill alone when steps is 0: the loop's first choice needs no further call
        loop = DecodeLoop(backend, backend.make_head(Sampling()), backend.tokenizer.ids, mode="structured",
                          limits=Limits(max_new_tokens=max(self.steps, 1)))
        for sample in self.samples:
            image = self._preprocess(sample.image)
            if image is not None:
                request = build_request(backend, sample, image)
                if sample.image not in self._embeds:
                    self._embeds[sample.image] = backend.encode_image(image)
                recorded.clear()
                loop.run(request.prompt_ids, self._embeds[sample.image], request.positions, request.rope_delta,
                         request.grammar)
                yield from recorded[: 1 + self.steps]
            if self.progress is not None:
                self.progress.update()
