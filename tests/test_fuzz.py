"""Any model output is survivable: the whole request (loop, grammar, decode, parse, result) fuzzed, no model.

A stand-in backend plays a model that emits arbitrary ids from the whole embedding: after each
step its hidden state points at the id it "wants" next (one row of a table of unit rows, so the
real numpy head picks exactly that id wherever the step allows it, and the nearest allowed row
where it does not). What it wants is a near-valid answer of the task (groups of phrases and
geometries, or the keypoint JSON), mutated by insertions, deletions, substitutions, repeats and
truncation, then noise, with ids biased toward specials, coordinates (<0> above all), the
grammar's structural ids and the embedding's padding rows (2022..2047 have no text). Every
task, exact and structured decoding, both grammar cores (C extension, Python reference), and
phrase-constrained decoding run through ``RexOmni.run``, the batch and the stream pipelines.

Every stream: no exception; the result dictionary has every key and is JSON (no NaN);
``extracted_predictions`` is ``parse_prediction(raw_output)``; ``raw_output`` is the text of the
ids that have text, ``padding_tokens`` the number of those that have none. Exact mode: the output
is exactly what the model wanted (the full head allows every row). Structured mode: every token
was offered by the documented grammar (the Python core replayed), and no padding row appears.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_api import EXTRA_KEYS, OFFICIAL_KEYS
from test_loop import RecordingBackend, full, offered, text_ids
from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.api import RexOmni
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.decode.grammar import COORDS_PER_GEOMETRY, GEOMETRY_OF_TASK, make_grammar
from rexedge.runtime.results.parse import parse_prediction
from rexedge.runtime.request.prompts import KEYPOINT_NAMES
from rexedge.runtime.results.detections import detections_to_json
from rexedge.runtime.request.tokenizer import Tokenizer

ROWS = 2048          # the tiny embedding: 2,022 ids with text, then 26 padding rows
WIDTH = 64
SCALE = 12.0
TASKS = tuple(GEOMETRY_OF_TASK)
COMBOS = [(task, mode, impl) for task in TASKS for mode in ("exact", "structured") for impl in ("c", "python")]
STREAMS_PER_COMBO = 80              # default run: 8 tasks x 2 modes x 2 cores x 80 = 2,560 streams
LONG_STREAMS_PER_COMBO = 1600       # the marked long run: 51,200 streams
CATEGORIES = ["cup", "door handle", "person", "red cupboard"]
STOP_REASONS = {"eos", "grammar_done", "max_new_tokens", "max_boxes", "zero_box", "repeated_box", "context_full"}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoint)


class WishingBackend(RecordingBackend):
    """A model that wants ``script[p]`` at output position p (past the script: noise from ``sample``).

    ``wishes`` records what it wanted at each position it was asked about; exact decoding must
    give exactly those ids."""

    def __init__(self, tokenizer: Tokenizer, table: np.ndarray) -> None:
        super().__init__(tokenizer, table, self._wish)
        self.config = RexOmniConfig.preset("tiny")
        self.script: list[int] = []
        self.noise = 0.0
        self.rng = np.random.default_rng(0)
        self.wishes: list[int] = []

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        # decode positions follow the prompt's (rope_positions' rope_delta): the steps are checked against them
        self.rope_delta = int(position_ids.max()) + 1 - position_ids.shape[1]
        return super().prefill(inputs_embeds, position_ids)

    def encode_image(self, image) -> np.ndarray:
        return self.rng.standard_normal((image.num_image_tokens, self.embed_table.shape[1])).astype(np.float32)

    def _wish(self) -> np.ndarray:
        position = sum(len(step) for step in self.steps)
        del self.wishes[position:]
        if position < len(self.script) and self.rng.random() >= self.noise:
            wish = self.script[position]
        else:
            wish = sample_id(self.rng, self.tokenizer)
        self.wishes.append(wish)
        return SCALE * self.embed_table[wish]


def unit_table(seed: int) -> np.ndarray:
    """Random unit rows: row t is the only row whose logit reaches SCALE at hidden SCALE * row t (others stay
    near SCALE * 0.5 at most, below SCALE / 1.05 after the repetition penalty)."""
    table = np.random.default_rng(seed).standard_normal((ROWS, WIDTH)).astype(np.float32)
    return table / np.linalg.norm(table, axis=1, keepdims=True)


def sample_id(rng: np.random.Generator, tokenizer: Tokenizer) -> int:
    """An id from the whole embedding, biased toward what breaks parsers: specials, coordinates, padding."""
    ids, r = tokenizer.ids, rng.random()
    if r < 0.2:
        return int(rng.integers(ids.endoftext, tokenizer.vocab_size))          # the 22 specials
    if r < 0.4:
        return ids.coord_start if rng.random() < 0.2 else ids.coord_start + int(rng.integers(0, ids.num_coords))
    if r < 0.55:
        return int(rng.integers(tokenizer.vocab_size, ROWS))                   # padding rows: no text
    if r < 0.75:
        return int(rng.choice([ids.comma, ids.space, *ids.none, ids.object_ref_start, ids.object_ref_end,
                               ids.box_start, ids.box_end, ids.im_end]))
    return int(rng.integers(0, ROWS))


def valid_answer(rng: np.random.Generator, tokenizer: Tokenizer, task: str) -> list[int]:
    """The ids of a grammatical answer of ``task`` (zero boxes and repeats now and then, for the guards)."""
    ids = tokenizer.ids
    coord = lambda: 0 if rng.random() < 0.1 else int(rng.integers(0, ids.num_coords))  # noqa: E731
    if task == "keypoint":
        tokens = tokenizer.encode_text('```json\n{"person1": {"bbox": "')
        for _ in range(4):
            tokens += tokenizer.encode_text(" ") + [ids.coord_token(coord())]
        tokens += tokenizer.encode_text(' ", "keypoints": {')
        for name in rng.choice(KEYPOINT_NAMES["person"], int(rng.integers(0, 5)), replace=False):
            point = tokenizer.encode_text(" ") + [ids.coord_token(coord()), ids.coord_token(coord())]
            value = tokenizer.encode_text('"unvisible"') if rng.random() < 0.3 else (
                tokenizer.encode_text('"') + point + tokenizer.encode_text(' "'))
            tokens += tokenizer.encode_text(f'"{name}": ') + value + tokenizer.encode_text(", ")
        return tokens + tokenizer.encode_text("}}}\n```") + [ids.im_end]
    groups = []
    for _ in range(int(rng.integers(0, 4))):
        phrase = tokenizer.encode_text(str(rng.choice(CATEGORIES)))
        if rng.random() < 0.2:
            groups.append((phrase, None))
            continue
        n = COORDS_PER_GEOMETRY.get(GEOMETRY_OF_TASK[task]) or 2 * int(rng.integers(3, 7))   # polygons: 6..12
        geoms = [tuple(coord() for _ in range(n)) for _ in range(int(rng.integers(1, 4)))]
        if rng.random() < 0.1:
            geoms.append((0,) * n)
        if rng.random() < 0.2:
            geoms.append(geoms[0])
        groups.append((phrase, geoms))
    return full(ids, groups)


def mutate(rng: np.random.Generator, tokenizer: Tokenizer, tokens: list[int]) -> list[int]:
    tokens = list(tokens)
    for _ in range(int(rng.integers(0, 6))):
        at = int(rng.integers(0, len(tokens) + 1))
        op = rng.integers(0, 5)
        if op == 0:
            tokens.insert(at, sample_id(rng, tokenizer))
        elif op == 1 and at < len(tokens):
            del tokens[at]
        elif op == 2 and at < len(tokens):
            tokens[at] = sample_id(rng, tokenizer)
        elif op == 3:
            tokens[at:at] = tokens[max(0, at - int(rng.integers(1, 8))):at]     # a repeated stretch
        else:
            tokens = tokens[:at]
    return tokens


class Models:
    """One ``RexOmni`` per decoding mode and limits over the stand-in backend (a head is costly to make)."""

    def __init__(self, backend: WishingBackend) -> None:
        self.backend, self._models = backend, {}

    def get(self, mode: str, max_tokens: int, max_boxes: int) -> RexOmni:
        key = (mode, max_tokens, max_boxes)
        if key not in self._models:
            # small images: the prompts stay short and preprocessing cheap
            self._models[key] = RexOmni(None, backend=self.backend, decoding=mode, max_tokens=max_tokens,
                                        max_boxes=max_boxes, min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
        return self._models[key]


def fuzz_one(models: Models, rng: np.random.Generator, task: str, mode: str, impl: str, text: np.ndarray) -> dict:
    """One fuzzed request through ``RexOmni.run``, checked; returns the result."""
    backend = models.backend
    tokenizer = backend.tokenizer
    model = models.get(mode, int(rng.choice([1, 8, 40, 120, 300])), int(rng.choice([1, 3, 1000])))
    model.constrain_phrases = bool(rng.random() < 0.5)
    backend.max_context = 100_000
    height, width = (int(v) for v in rng.integers(8, 400, 2))
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    prepared = model.prepare(image, task, CATEGORIES[:int(rng.integers(1, 5))], keypoint_type="person",
                             visual_prompt_boxes=[[1, 2, width - 1, height - 1]])
    if impl == "python":
        prepared = dataclasses.replace(prepared, grammar=make_grammar(task, tokenizer.ids, prepared.image.image_size,
                                                                      impl="python", decode=model.decode))
    backend.rng, backend.noise = rng, float(rng.choice([0.0, 0.02, 0.2]))
    backend.script = mutate(rng, tokenizer, valid_answer(rng, tokenizer, task))
    backend.max_context = len(prepared.prompt_ids) + int(rng.integers(1, 200)) if rng.random() < 0.2 else 100_000
    result = model.run(prepared)
    check_result(result, tokenizer, task)
    out = result["output_token_ids"]
    if mode == "exact":
        assert out == backend.wishes[:len(out)], "exact decoding chose other than the full head's argmax"
    else:
        assert result["padding_tokens"] == 0, "structured decoding chose a padding row"
        grammar = make_grammar(task, tokenizer.ids, (width, height), impl="python", decode=model.decode)
        for position, token in enumerate(out):
            assert offered(*grammar.next(), token, tokenizer.ids, text, grammar.coord_range()), (position, token, out)
            grammar.advance(token)
    return result


def check_result(result: dict, tokenizer: Tokenizer, task: str) -> None:
    assert set(result) == OFFICIAL_KEYS | EXTRA_KEYS and result["success"] is True
    json.dumps({**result, "detections": detections_to_json(result["detections"])}, allow_nan=False)
    out = result["output_token_ids"]
    assert all(0 <= t < ROWS for t in out) and result["num_output_tokens"] == len(out)
    assert result["stop_reason"] in STOP_REASONS
    assert result["raw_output"] == tokenizer.decode([t for t in out if t < tokenizer.vocab_size])
    assert result["padding_tokens"] == sum(t >= tokenizer.vocab_size for t in out)
    assert result["extracted_predictions"] == parse_prediction(result["raw_output"], *result["image_size"], task)


def fuzz(tokenizer: Tokenizer, streams_per_combo: int, seed: int) -> dict[str, int]:
    models = Models(WishingBackend(tokenizer, unit_table(seed)))
    text = text_ids(tokenizer, ROWS)
    seen = {"streams": 0, "padding": 0, "boxes": 0}
    seen.update({reason: 0 for reason in STOP_REASONS})
    for index, (task, mode, impl) in enumerate(COMBOS):
        for stream in range(streams_per_combo):
            rng = np.random.default_rng([seed, index, stream])
            try:
                result = fuzz_one(models, rng, task, mode, impl, text)
            except Exception as error:
                raise AssertionError(f"stream {stream} of {task}/{mode}/{impl} (seed {seed}) failed: {error!r}") from error
            seen["streams"] += 1
            seen["padding"] += result["padding_tokens"] > 0
            seen["boxes"] += bool(result["detections"])
            seen[result["stop_reason"]] += 1
    return seen


def test_fuzzed_model_output_never_breaks_a_request(tokenizer: Tokenizer) -> None:
    seen = fuzz(tokenizer, STREAMS_PER_COMBO, seed=19)
    assert seen["streams"] == len(COMBOS) * STREAMS_PER_COMBO
    # the fuzz reached what it is for: padding ids in answers, detections, and every way an answer stops
    missing = [key for key, count in seen.items() if not count and key != "grammar_done"]
    assert not missing, seen


@pytest.mark.long_fuzz
def test_long_fuzz(tokenizer: Tokenizer) -> None:
    seen = fuzz(tokenizer, LONG_STREAMS_PER_COMBO, seed=20)
    assert seen["streams"] == len(COMBOS) * LONG_STREAMS_PER_COMBO


def test_a_backend_object_takes_no_model_path_or_backend_options(tokenizer: Tokenizer) -> None:
    backend = WishingBackend(tokenizer, unit_table(1))
    for wrong in ({"model_path": "bundle"}, {"model_path": None, "device": "cuda"},
                  {"model_path": None, "max_context": 64}):
        with pytest.raises(RexEdgeError, match="a backend object comes ready: pass model_path=None and no device"):
            RexOmni(backend=backend, **wrong)


# --------------------------------------------------------------------------- pipelines


@pytest.fixture
def garbage_model(tokenizer: Tokenizer) -> tuple[RexOmni, WishingBackend]:
    """Exact decoding of pure noise: every answer is garbage, padding ids included."""
    backend = WishingBackend(tokenizer, unit_table(7))
    backend.noise = 1.0
    return RexOmni(None, backend=backend, decoding="exact", max_tokens=80), backend


def test_batch_records_garbage_output_as_ordinary_results(garbage_model, tokenizer: Tokenizer, tmp_path: Path) -> None:
    model, backend = garbage_model
    rng = np.random.default_rng(3)
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 200)), int(rng.integers(20, 200)), 3),
                                     dtype=np.uint8)).save(paths[-1])
    summary = model.batch([str(p) for p in paths], tmp_path / "out.jsonl", task="detection", categories=["cup"],
                          progress=False)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary.failed == 0 and summary.done == len(paths) == len(records)
    assert all(r["status"] == "ok" for r in records)
    assert sum(r["padding_tokens"] for r in records) > 0
    for record in records:
        assert record["extracted_predictions"] == parse_prediction(record["raw_output"], *record["image_size"],
                                                                   "detection")


def test_stream_yields_garbage_output_as_ordinary_results(garbage_model, tokenizer: Tokenizer) -> None:
    model, _ = garbage_model
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (int(rng.integers(20, 200)), int(rng.integers(20, 200)), 3), dtype=np.uint8)
              for _ in range(12)]
    with model.stream(iter(frames), task="keypoint", categories=["person"], keypoint_type="person") as stream:
        results = list(stream)
    assert [r.index for r in results] == list(range(len(frames)))
    assert sum(r.result["padding_tokens"] for r in results) > 0
    for r in results:
        check_result(r.result, tokenizer, "keypoint")


def test_issue_scenario_on_the_tiny_model(tmp_path: Path) -> None:
    """The issue's run at test size: a checkpoint whose padding rows are random (as a real one's), the ort
    backend in exact mode: the model chooses padding rows, and every request completes."""
    from rexedge.bench.padding_survival import run
    from rexedge.export.bundle import export_bundle
    from rexedge.export.fixtures.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "checkpoint", seed=3, padding_rows="random")
    summary = run(export_bundle(checkpoint, tmp_path / "bundle", progress=False), requests=4, max_tokens=150, seed=0)
    assert summary["completed"] == 4, summary["records"]
    assert summary["padding_tokens"] > 0 and summary["embedding_rows"] == ROWS
