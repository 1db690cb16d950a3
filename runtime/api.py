"""The public API: ``RexOmni``, a drop-in for the official ``RexOmniWrapper``.

    from rexedge.runtime import RexOmni
    model = RexOmni("path/to/bundle")                  # backend="ort", CPU
    [result] = model.inference(image, task="detection", categories=["cup", "door handle"])
    result["extracted_predictions"]                    # the official parser's dictionary
    result["detections"]                               # typed, with per-box scores

Each result dictionary (``rexedge.runtime.results.result.Result.to_official``) has the official wrapper's keys (``success``, ``image_size``,
``resized_size``, ``task``, ``prompt``, ``raw_output``, ``extracted_predictions``,
``inference_time``, ``num_output_tokens``, ``num_prompt_tokens``, ``generation_time``,
``tokens_per_second``) plus ``output_token_ids``, ``detections``, ``absent`` (phrases
answered "None"), ``stop_reason``, ``padding_tokens`` (output ids without text, the embedding's
padding rows: they decode to nothing, as in the ``tokenizers`` library) and ``timings``
(seconds per stage).

``constrain_phrases=True`` (structured decoding, detection and pointing): each phrase is
one of the requested categories, chosen among their tokens (``rexedge.runtime.decode.phrases``);
by default phrases are free text, as the model writes them. Structured boxes are always
well-ordered (x1 > x0, y1 > y0); with constrained phrases each category is answered at most once.
``none_by_mass=True`` (structured): a category gets a box rather than "None" when the coordinate
tokens' total probability exceeds "None"'s (``rexedge.runtime.decode.loop``).

``parallel_categories=True`` (detection and pointing, with ``max_batch`` >= the number of categories):
one image's K categories become K branches, each asking one category, that share the prefill of the
system prompt and image and decode together; the answers merge in category order
(``rexedge.runtime.decode.branches``).

``min_pixels`` / ``max_pixels``: the image-size range images are resized into; by default a bundle's own
(``rexedge export --min-pixels --max-pixels``, for a model trained on small images such as the demo's),
else the official wrapper's 16*28*28 .. 2560*28*28.

``max_batch=N`` (backends ``ort`` and ``torch``, on the CPU and CUDA, and ``trt``): up to N requests decode together, one
backend step for all of them (``rexedge.runtime.decode.loop``, ``DecodeLoop.run_batch``); a finished
request's slot takes the next one at once. ``inference(images=[...])``, ``batch`` and ``streams`` use
it; each answer is the one the request would get alone.

Pipelines on top (docs/pipelines.md): ``model.stream(source, ...)`` yields results frame by
frame from a video file, camera, URL or iterable of frames (``rexedge.runtime.pipelines.stream``);
``model.batch(inputs, out, ...)`` runs a folder, glob or list of images to resumable JSONL
and COCO (``rexedge.runtime.pipelines.batch``). Both split each request with ``prepare`` (host side,
on a worker thread) and ``run`` (the backend), so the next image is prepared while the
current one decodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from rexedge.runtime.backends import Backend, load_backend
from rexedge.runtime.decode.branches import Branch, decode_branches, merged_tokens
from rexedge.runtime.decode.grammar import Grammar, make_grammar
from rexedge.runtime.decode.head import Sampling
from rexedge.runtime.decode.loop import DecodeLoop, Generation, Limits, SequenceInput
from rexedge.runtime.decode.phrases import PhraseTable, phrase_table
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.encode import encode_task
from rexedge.runtime.request.preprocess import MAX_PIXELS, MIN_PIXELS, ImageInput, PreprocessedImage, preprocess
from rexedge.runtime.request.prompts import DEFAULT_SYSTEM_PROMPT, TaskPrompt
from rexedge.runtime.results.parse import parse_prediction
from rexedge.runtime.results.result import Result, Timings

# tasks whose phrases name a requested category (OCR phrases are recognized text)
PHRASE_CONSTRAINED_TASKS = ("detection", "pointing")
K = TypeVar("K")

if TYPE_CHECKING:
    from rexedge.runtime.pipelines.batch import BatchSummary
    from rexedge.runtime.pipelines.stream import FrameStream
    from rexedge.runtime.pipelines.streams import MultiStream


class RexOmni:
    """Rex-Omni on one backend, chosen once: ``ort`` (a bundle) or ``torch`` (a checkpoint).

    ``backend`` is a name (see ``rexedge.runtime.backends``), or a backend object already made
    (a custom backend, a stand-in in tests) with ``model_path=None``.
    """

    def __init__(
        self,
        model_path: str | Path | None,
        backend: str | Backend = "ort",
        device: str = "cpu",
        decoding: str = "structured",
        max_tokens: int = 4096,
        temperature: float = 0.0,
        top_p: float = 0.8,
        top_k: int = 1,
        repetition_penalty: float = 1.05,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_boxes: int = 1000,
        seed: int | None = None,
        constrain_phrases: bool = False,
        none_by_mass: bool = False,
        max_batch: int = 1,
        parallel_categories: bool = False,
        **backend_options: Any,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise RexEdgeError(f"max_batch must be a positive integer (sequences decoded together), got {max_batch!r}")
        if isinstance(backend, str):
            if max_batch > 1:
                backend_options["max_batch"] = max_batch
            self.backend = load_backend(backend, model_path, device=device, **backend_options)
        elif model_path is not None or device != "cpu" or backend_options:
            raise RexEdgeError("a backend object comes ready: pass model_path=None and no device or backend options")
        else:
            self.backend = backend
            if max_batch > getattr(backend, "max_batch", 1):
                raise RexEdgeError(f"max_batch={max_batch}, but the backend object steps at most "
                                   f"{getattr(backend, 'max_batch', 1)} sequence(s) together")
        self.max_batch = max_batch
        self.parallel_categories = parallel_categories
        self.config = self.backend.config
        self.tokenizer = self.backend.tokenizer
        self.ids = self.tokenizer.ids
        # the image-size range: as given, else the bundle's own (the range its model was trained for), else
        # the official wrapper's defaults
        own_min, own_max = self.backend.pixels or (MIN_PIXELS, MAX_PIXELS)
        self.min_pixels = own_min if min_pixels is None else min_pixels
        self.max_pixels = own_max if max_pixels is None else max_pixels
        self.system_prompt = system_prompt
        # The official wrapper samples only when temperature > 0; top_p / top_k apply then.
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k if temperature > 0 else 0,
                            repetition_penalty=repetition_penalty, seed=seed)
        # one head per slot: each keeps its sequence's seen-token record and sampling state
        heads = [self.backend.make_head(sampling) for _ in range(max_batch)]
        self.constrain_phrases = constrain_phrases
        self.loop = DecodeLoop(self.backend, heads[0], self.ids, mode=decoding,
                               limits=Limits(max_new_tokens=max_tokens, max_boxes=max_boxes), none_by_mass=none_by_mass,
                               heads=heads)

    def inference(
        self,
        images: ImageInput | Sequence[ImageInput],
        task: str = "detection",
        categories: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        keypoint_type: str | None = None,
        visual_prompt_boxes: Sequence[Sequence[float]] | None = None,
        channel_order: str = "rgb",
    ) -> list[dict[str, Any]]:
        """One result dictionary per image (see the module docstring).

        ``images``: one image or a list; each a path, a PIL image or an HxWx3 uint8 array
        (RGB unless ``channel_order="bgr"``, as OpenCV frames are). ``categories``: one list
        for every image, or one list per image.
        """
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise RexEdgeError("images: expected at least one image, got an empty list")
        per_image = _per_image_categories(categories, len(batch))
        if self.max_batch == 1 or self.parallel_categories:
            return [self.run(self.prepare(image, task, cats, keypoint_type, visual_prompt_boxes, channel_order))
                    for image, cats in zip(batch, per_image)]
        # decoded together (max_batch at a time); every request is checked before the first decodes
        prepared = []
        for index, (image, cats) in enumerate(zip(batch, per_image)):
            try:
                prepared.append(self.prepare(image, task, cats, keypoint_type, visual_prompt_boxes, channel_order))
            except RexEdgeError as e:
                raise type(e)(f"images[{index}]: {e}") from e
        results: list[dict[str, Any] | None] = [None] * len(prepared)
        for index, result in self.run_many(enumerate(prepared)):
            if isinstance(result, Exception):
                raise RexEdgeError(f"images[{index}]: {type(result).__name__}: {result}") from result
            results[index] = result
        return results

    def prepare(self, image: ImageInput, task: str = "detection", categories: Any = None,
                keypoint_type: str | None = None, visual_prompt_boxes: Any = None,
                channel_order: str = "rgb") -> PreparedRequest:
        """The host-side half of one request (preprocess, prompt, positions, grammar); no backend call.

        Safe to run on another thread while ``run`` decodes the previous request: pipelines
        (``stream``, ``batch``) prepare the next image this way. Each prepared request holds
        a fresh grammar and is ``run`` once.
        """
        cfg, ids = self.config, self.ids
        t0 = time.perf_counter()
        pre = preprocess(image, self.min_pixels, self.max_pixels, cfg=cfg, channel_order=channel_order)
        task_prompt, prompt_ids, positions, rope_delta = encode_task(self.tokenizer, pre, task, categories,
                                                                     keypoint_type, visual_prompt_boxes,
                                                                     self.system_prompt)
        if len(prompt_ids) >= self.backend.max_context:
            raise RexEdgeError(f"the prompt needs {len(prompt_ids)} tokens but the backend holds "
                               f"{self.backend.max_context}; lower max_pixels or raise max_context")
        grammar = make_grammar(task, ids, pre.image_size, decode=self.decode)
        phrases = None
        if self.constrain_phrases and task in PHRASE_CONSTRAINED_TASKS:
            names = [categories] if isinstance(categories, str) else list(categories)
            phrases = phrase_table([self.tokenizer.encode_text(name) for name in names], ids.object_ref_end)
        branches = None
        names = [categories] if isinstance(categories, str) else list(categories or [])
        if self.parallel_categories and task in PHRASE_CONSTRAINED_TASKS and len(names) > 1:
            if len(names) > self.max_batch:
                raise RexEdgeError(f"parallel_categories: {len(names)} categories need max_batch >= {len(names)} "
                                   f"(one slot per category), the model has max_batch={self.max_batch}")
            branches = [self._branch(pre, task, name) for name in names]
        return PreparedRequest(task, pre, task_prompt, prompt_ids, positions, rope_delta, grammar,
                               time.perf_counter() - t0, phrases, branches)

    def _branch(self, pre: PreprocessedImage, task: str, name: str) -> Branch:
        """One category's prompt on ``pre`` (parallel categories)."""
        _, prompt_ids, positions, rope_delta = encode_task(self.tokenizer, pre, task, [name], None, None,
                                                           self.system_prompt)
        phrases = (phrase_table([self.tokenizer.encode_text(name)], self.ids.object_ref_end)
                   if self.constrain_phrases else None)
        return Branch(prompt_ids, positions, rope_delta, make_grammar(task, self.ids, pre.image_size,
                                                                      decode=self.decode), phrases)

    def run(self, prepared: PreparedRequest, loop: DecodeLoop | None = None) -> dict[str, Any]:
        """The backend half: encode the image, decode, parse; one result dictionary (``Result.to_official``).

        ``loop``: decode with this loop instead of the model's own (the benchmarks force answers with one
        around a scripted head and a timed backend)."""
        t1 = time.perf_counter()
        image_embeds = self.backend.encode_image(prepared.image)
        vision_s = time.perf_counter() - t1
        if prepared.branches is not None:
            gen = self._decode_branches(prepared, image_embeds, loop or self.loop)
            return self._result(prepared, gen, t1, vision_s)
        gen = (loop or self.loop).run(prepared.prompt_ids, image_embeds, prepared.positions, prepared.rope_delta,
                                      prepared.grammar, prepared.phrases)
        return self._result(prepared, gen, t1, vision_s)

    def _decode_branches(self, prepared: PreparedRequest, image_embeds: np.ndarray, loop: DecodeLoop) -> Generation:
        """Parallel categories: the branches decoded together (``rexedge.runtime.decode.branches``), merged
        into one Generation in category order; the request's grammar reads the merged answer (its absent
        phrases, and a check that it is grammatical)."""
        t0 = time.perf_counter()
        gens, prefill_s = decode_branches(loop, prepared.branches, image_embeds)
        tokens = merged_tokens(gens, self.ids)
        stops = [g.stop_reason for g in gens if g.stop_reason != "eos"]
        if not stops:   # every branch answered in full: the merged answer is one of the task's grammar
            for token in tokens:
                prepared.grammar.advance(token)
        steps = {kind: sum(g.steps.get(kind, 0) for g in gens) for kind in gens[0].steps}
        return Generation(token_ids=tokens, detections=[d for g in gens for d in g.detections],
                          stop_reason=stops[0] if stops else "eos", prefill_s=prefill_s,
                          decode_s=time.perf_counter() - t0 - prefill_s,
                          backend_s=max(g.backend_s for g in gens), steps=steps,
                          forced_tokens=sum(g.forced_tokens for g in gens))

    def run_many(self, requests: Iterable[tuple[K, PreparedRequest | Exception]]
                 ) -> Iterator[tuple[K, dict[str, Any] | Exception]]:
        """Decode prepared requests ``max_batch`` at a time (``DecodeLoop.run_batch``): (key, result
        dictionary) as each finishes, in the order they finish; a request's failure (an exception given
        in its place, as a pipeline's failed preparation; or its image encoding or prefill failing) is
        (key, the exception), and the others go on. ``requests`` is read as slots free up, so it may be
        a generator that prepares ahead."""
        if self.parallel_categories:   # each image's categories fill the slots: images go one at a time
            for key, prepared in requests:
                try:
                    outcome = prepared if isinstance(prepared, Exception) else self.run(prepared)
                except Exception as e:  # this request's failure
                    outcome = e
                yield key, outcome
            return
        started: dict[int, tuple[PreparedRequest, float, float]] = {}

        def start_of(number: int, prepared: PreparedRequest | Exception):
            def start() -> SequenceInput:
                if isinstance(prepared, Exception):
                    raise prepared
                t1 = time.perf_counter()
                image_embeds = self.backend.encode_image(prepared.image)
                started[number] = (prepared, t1, time.perf_counter() - t1)
                return SequenceInput(prepared.prompt_ids, image_embeds, prepared.positions, prepared.rope_delta,
                                     prepared.grammar, prepared.phrases)
            return start

        keys: dict[int, K] = {}

        def numbered() -> Iterator[tuple[int, Any]]:
            for number, (key, prepared) in enumerate(requests):
                keys[number] = key
                yield number, start_of(number, prepared)

        for number, outcome in self.loop.run_batch(numbered()):
            if isinstance(outcome, Generation):
                prepared, t1, vision_s = started.pop(number)
                try:
                    outcome = self._result(prepared, outcome, t1, vision_s)
                except Exception as e:  # this request's failure (its answer could not be parsed)
                    outcome = e
            else:
                started.pop(number, None)
            yield keys.pop(number), outcome

    def _result(self, prepared: PreparedRequest, gen: Generation, t1: float, vision_s: float) -> dict[str, Any]:
        """The result dictionary of a decoded request (``t1``: when its image encoding began)."""
        pre, grammar = prepared.image, prepared.grammar
        raw_output = self.decode(gen.token_ids)
        width, height = pre.image_size
        extracted = parse_prediction(raw_output, width, height, prepared.task)
        # preparation may have run ahead on another thread: count its own time, not the wait since
        total = prepared.preprocess_s + time.perf_counter() - t1
        return Result(
            task=prepared.task, image_size=pre.image_size, resized_size=pre.resized_size,
            prompt=prepared.task_prompt.text, raw_output=raw_output, extracted_predictions=extracted,
            inference_time=total, output_token_ids=gen.token_ids, num_prompt_tokens=len(prepared.prompt_ids),
            detections=gen.detections, absent=grammar.absent, stop_reason=gen.stop_reason,
            padding_tokens=self.tokenizer.count_textless(gen.token_ids),
            timings=Timings(preprocess_s=prepared.preprocess_s, vision_s=vision_s, prefill_s=gen.prefill_s,
                            decode_s=gen.decode_s, decode_backend_s=gen.backend_s, steps=gen.steps)
        ).to_official()

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ids the model produced; padding rows of the embedding (no text) decode to nothing."""
        return self.tokenizer.decode(token_ids, rows=self.backend.embed_table.shape[0])

    def stream(self, source: Any, task: str = "detection", categories: Any = None,
               keypoint_type: str | None = None, visual_prompt_boxes: Any = None, *, live: bool | None = None,
               every: int = 1, channel_order: str | None = None, prepare_ahead: bool = True) -> FrameStream:
        """Detections frame by frame from a video file, camera, URL / GStreamer pipeline or iterable of frames.

        See ``rexedge.runtime.pipelines.stream`` (sources, channel order, latest-frame-wins for live sources).
        """
        from rexedge.runtime.pipelines.stream import FrameStream, open_source

        request = dict(task=task, categories=categories, keypoint_type=keypoint_type,
                       visual_prompt_boxes=visual_prompt_boxes)
        return FrameStream(self, open_source(source, live=live, every=every, channel_order=channel_order),
                           request, prepare_ahead=prepare_ahead)

    def streams(self, sources: Sequence[Any], task: str = "detection", categories: Any = None,
                keypoint_type: str | None = None, visual_prompt_boxes: Any = None, *, live: bool | None = None,
                every: int = 1, channel_order: str | None = None) -> MultiStream:
        """Several sources (cameras, files, URLs, iterables of frames) decoded together, latest frame of each:
        one result per source and round, ``StreamResult.source`` its index in ``sources``; see
        ``rexedge.runtime.pipelines.streams``. Make the model with ``max_batch >= len(sources)`` for one
        backend step per round."""
        from rexedge.runtime.pipelines.streams import MultiStream

        return MultiStream(self, [self.stream(source, task, categories, keypoint_type, visual_prompt_boxes, live=live,
                                              every=every, channel_order=channel_order) for source in sources])

    def batch(self, inputs: Any, out: str | Path, task: str = "detection", categories: Any = None,
              **options: Any) -> BatchSummary:
        """Images from a folder, glob or list file to a resumable JSONL file; see ``rexedge.runtime.pipelines.batch``."""
        from rexedge.runtime.pipelines.batch import run_batch

        return run_batch(self, inputs, out, task=task, categories=categories, **options)


@dataclass(frozen=True, eq=False)
class PreparedRequest:
    """One request ready for the backend (``RexOmni.prepare``): everything but the model's work."""

    task: str
    image: PreprocessedImage
    task_prompt: TaskPrompt
    prompt_ids: np.ndarray
    positions: np.ndarray
    rope_delta: int
    grammar: Grammar
    preprocess_s: float
    phrases: PhraseTable | None = None
    branches: list[Branch] | None = None   # parallel categories: one request per category, sharing the image


def _per_image_categories(categories: Any, n: int) -> list[Any]:
    if categories is None or isinstance(categories, str):
        return [categories] * n
    categories = list(categories)
    if categories and all(isinstance(c, (list, tuple)) for c in categories):
        if len(categories) != n:
            raise RexEdgeError(f"categories: {len(categories)} per-image lists for {n} images")
        return categories
    return [categories] * n
