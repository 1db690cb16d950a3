"""Batched decoding (``max_batch`` > 1) on the real ort and torch CPU backends of the tiny checkpoint.

The reference is each request decoded alone by the batch-1 backend: every sequence of a batch must
give the same tokens, stop reason and boxes, whatever else shares its steps. The batches mix image
sizes, prompt lengths (categories), tasks and answer lengths (each request its own max_new_tokens),
hold more requests than slots (finished slots are refilled mid-run), and in structured mode carry
jump-forward runs of different lengths in one step (constrained categories longer than a step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_loop import KeepGoing, response_pattern

from rexedge.runtime.backends import BackendError, load_backend
from rexedge.runtime.decode.head import Sampling
from rexedge.runtime.decode.loop import MAX_STEP_TOKENS, DecodeLoop, Limits, SequenceInput
from rexedge.runtime.errors import RexEdgeError

LONG_NAME = " ".join(["door handle of the red cupboard"] * 14)   # a constrained rest longer than one step
CATEGORIES = [["cup"], ["cup", "door handle", LONG_NAME], ["a dog", "red car", "x", "person on a bike"], ["z"]]


@pytest.fixture(scope="module")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rexedge.export.bundle import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("batched") / "bundle", progress=False)


@pytest.fixture(scope="module", params=["ort", "torch"])
def models(request, tiny_bundle: Path, tiny_checkpoint: Path):
    """(batch-1 model, max_batch=3 model) of one backend."""
    from rexedge.runtime.api import RexOmni

    path = tiny_bundle if request.param == "ort" else tiny_checkpoint
    return (RexOmni(path, backend=request.param, max_context=1024, max_tokens=150),
            RexOmni(path, backend=request.param, max_context=1024, max_tokens=150, max_batch=3))


class CountingBackend:
    """A batch backend behind the loop, recording the rows and widths of every batched step."""

    def __init__(self, backend) -> None:
        self.inner = backend
        self.name, self.config, self.tokenizer = backend.name, backend.config, backend.tokenizer
        self.embed_table, self.max_context, self.max_batch = backend.embed_table, backend.max_context, backend.max_batch
        self.pixels = backend.pixels
        self.calls: list[tuple[int, int, list[int]]] = []   # (rows, width, counts) per step_batch
        self.prefills: list[int] = []

    def prefill(self, inputs_embeds, position_ids, slot: int = 0):
        self.prefills.append(slot)
        return self.inner.prefill(inputs_embeds, position_ids, slot=slot)

    def step_batch(self, token_ids, position_ids, counts):
        self.calls.append((token_ids.shape[0], token_ids.shape[1], counts.tolist()))
        return self.inner.step_batch(token_ids, position_ids, counts)

    def step(self, token_ids, position_ids):
        return self.inner.step(token_ids, position_ids)


def requests(model, mode: str, seed: int, count: int, tasks=("detection",)) -> list[tuple]:
    """``count`` random requests: (prepared, its limits), mixed image sizes, categories, tasks, lengths."""
    rng = np.random.default_rng(seed)
    made = []
    for i in range(count):
        image = rng.integers(0, 256, (int(rng.integers(30, 160)), int(rng.integers(30, 160)), 3), dtype=np.uint8)
        task = tasks[i % len(tasks)]
        model.constrain_phrases = mode == "structured" and i % 2 == 1 and task != "ocr_polygon"
        prepared = model.prepare(image, task, CATEGORIES[i % len(CATEGORIES)])
        made.append((prepared, Limits(max_new_tokens=int(rng.integers(5, 200)))))
    return made


class RecordingHead(KeepGoing):
    """KeepGoing (the real head, kept from ending before its 3rd group) that passes the batched loop's
    full-vocabulary logits on and records what each choice multiplied, at which batched step."""

    def __init__(self, inner, ids, backend: CountingBackend | None, log: list) -> None:
        super().__init__(inner, ids, groups=3)
        del self.choose_full, self.choose_range   # KeepGoing's pass-throughs: recorded here instead
        self.backend, self.log = backend, log
        self.given = False
        if hasattr(inner, "set_full_logits"):   # a host head: the batched loop's shared products reach it
            self.full_products, self.set_full_logits = inner.full_products, self._set_full_logits

    def _record(self, what: str) -> None:
        if self.backend is not None:
            self.log.append((len(self.backend.calls), id(self), what))

    def _set_full_logits(self, logits: np.ndarray) -> None:
        self.inner.set_full_logits(logits)
        self.given = True

    def choose_full(self, hidden, blocked=None):
        self._record("full (shared product)" if self.given else "full")
        self.given = False
        return self.inner.choose_full(hidden, blocked)

    def choose_range(self, hidden, start, stop, extra=()):
        self._record("coordinates")
        return self.inner.choose_range(hidden, start, stop, extra)

    def choose_ids(self, hidden, ids):
        self._record("ids")
        return super().choose_ids(hidden, ids)


def decode_all(model, backend, made: list[tuple], mode: str, max_batch: int, keep_going: bool, log: list | None = None):
    heads = [model.backend.make_head(Sampling()) for _ in range(max_batch)]
    if keep_going:
        counting = backend if isinstance(backend, CountingBackend) else None
        heads = [RecordingHead(head, model.ids, counting, [] if log is None else log) for head in heads]
    loop = DecodeLoop(backend, heads[0], model.ids, mode=mode, heads=heads)

    def start_of(prepared, limits):
        return lambda: SequenceInput(prepared.prompt_ids, model.backend.encode_image(prepared.image),
                                     prepared.positions, prepared.rope_delta, prepared.grammar, prepared.phrases,
                                     limits)

    finished = list(loop.run_batch((i, start_of(*item)) for i, item in enumerate(made)))
    return finished


def fresh(model, made):
    """The same requests with fresh grammars (a prepared request decodes once)."""
    from dataclasses import replace

    from rexedge.runtime.decode.grammar import make_grammar

    return [(replace(p, grammar=make_grammar(p.task, model.ids, p.image.image_size, decode=model.decode)), limits)
            for p, limits in made]


@pytest.mark.parametrize("mode", ["exact", "structured"])
def test_every_sequence_of_a_batch_is_the_one_decoded_alone(models, mode: str) -> None:
    single, batched = models
    tasks = ("detection", "pointing", "ocr_polygon") if mode == "structured" else ("detection",)
    for seed in range(2 if single.backend.name == "ort" else 1):   # the torch model is slower
        made = requests(batched, mode, seed, 7, tasks)
        counting = CountingBackend(batched.backend)
        log: list = []
        finished = decode_all(batched, counting, made, mode, 3, keep_going=mode == "structured", log=log)
        alone = dict(decode_all(single, single.backend, fresh(single, made), mode, 1, keep_going=mode == "structured"))
        assert sorted(key for key, _ in finished) == list(range(7))
        for key, gen in finished:
            ref = alone[key]
            assert gen.token_ids == ref.token_ids, (mode, seed, key)
            assert gen.stop_reason == ref.stop_reason
            assert [(d.phrase, d.bins) for d in gen.detections] == [(d.phrase, d.bins) for d in ref.detections]
            np.testing.assert_allclose([d.score for d in gen.detections], [d.score for d in ref.detections], rtol=1e-3)
            assert gen.steps == ref.steps
            if mode == "structured" and gen.stop_reason == "eos":
                prepared = made[key][0]
                assert response_pattern(prepared.task).fullmatch(batched.decode(gen.token_ids)), (seed, key)
        # sequences end at different steps, and finished slots were refilled while others decoded
        ends = [key for key, _ in finished]
        assert ends != sorted(ends) or len({len(g.token_ids) for _, g in finished}) > 1
        assert len(counting.prefills) == 7 and max(rows for rows, _, _ in counting.calls) == 3
        refills = [i for i, slot in enumerate(counting.prefills) if i >= 3]
        assert refills and all(counting.prefills[i] < 3 for i in refills)
        assert any(sum(c > 0 for c in counts) == 3 for _, _, counts in counting.calls)
        assert all(width <= MAX_STEP_TOKENS for _, width, _ in counting.calls)
        if mode == "structured":
            # jump-forward runs of different lengths shared a step
            assert any(len({c for c in counts if c}) > 1 for _, _, counts in counting.calls)
            # rows needing different allowed sets chose after the same step, each over its own rows: the full
            # vocabulary beside coordinates or a few ids; rows needing the full vocabulary together shared
            # one product
            by_step: dict[int, set[str]] = {}
            for step, _, what in log:
                by_step.setdefault(step, set()).add(what.split(" ")[0])
            assert any({"full", "coordinates"} <= kinds for kinds in by_step.values())
            assert any({"full", "ids"} <= kinds for kinds in by_step.values())
            assert any(what == "full (shared product)" for _, _, what in log)


def test_a_quantized_bundle_runs_its_head_graph_for_the_full_vocabulary_rows_of_a_batched_step(
        tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """An int8 bundle carries an int8 head graph that the batch-1 path multiplies full-vocabulary steps with;
    a batched step multiplies its full-vocabulary rows on that graph too (one call for all of them, never the
    float table), so in exact mode every sequence gives the tokens it gives decoded alone.

    The bundle's decoder computes in float (accuracy_level 1): with the shipped accuracy_level 4 the
    decoder's MatMulNBits rounds its activations to int8, and a batch's rows, summed in another order than
    one row (1e-6 apart), round differently now and then: batched and alone then part after some tens of
    tokens (3 of 6 runs of this test), whichever head multiplies."""
    from rexedge.export.bundle import export_bundle
    from rexedge.runtime.api import RexOmni
    from rexedge.runtime.backends.graph_session import HeadSession

    path = export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("int8") / "bundle", weights="int8", progress=False,
                         nbits_options={"accuracy_level": 1})
    single = RexOmni(path, max_context=1024, max_tokens=150)
    batched = RexOmni(path, max_context=1024, max_tokens=150, max_batch=3)
    head = batched.backend._head
    assert head is not None
    # the graph's rows of a batch are its rows one at a time up to float rounding (MatMulNBits sums a batch of
    # rows in another order than one row: measured 5e-7 at most here), far closer than the float table's
    # products (the int8 table's error, ~1e-2)
    rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
    hidden = rng.standard_normal((3, batched.config.hidden_size)).astype(np.float32) * 2
    together = head.logits(hidden).copy()
    scale = np.abs(together).max()
    for row in range(3):
        np.testing.assert_allclose(head.logits(hidden[row:row + 1])[0], together[row], rtol=0, atol=1e-5 * scale)
    assert np.abs(together - hidden @ batched.backend.embed_table.T).max() > 1e-3 * scale

    rows_per_call: list[int] = []
    logits = HeadSession.logits

    def counted(self, hidden: np.ndarray) -> np.ndarray:
        rows_per_call.append(hidden.shape[0])
        return logits(self, hidden)

    monkeypatch.setattr(HeadSession, "logits", counted)
    made = requests(batched, "exact", int(rng.integers(1 << 30)), 7)
    counting = CountingBackend(batched.backend)
    log: list = []
    finished = decode_all(batched, counting, made, "exact", 3, keep_going=True, log=log)
    batched_calls = [n for n in rows_per_call if n > 1]
    rows_per_call.clear()
    alone = dict(decode_all(single, single.backend, fresh(single, made), "exact", 1, keep_going=False))
    assert rows_per_call and set(rows_per_call) == {1}
    assert sorted(key for key, _ in finished) == list(range(7))
    for key, gen in finished:
        assert gen.token_ids == alone[key].token_ids, key
        assert gen.stop_reason == alone[key].stop_reason
    # the shared products ran on the head graph: one call per step with two or three full-vocabulary rows
    shared_steps = {step for step, _, what in log if what == "full (shared product)"}
    assert batched_calls and len(batched_calls) == len(shared_steps)


def test_inference_of_a_list_decodes_together_in_input_order(models) -> None:
    single, batched = models
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (int(rng.integers(30, 140)), int(rng.integers(30, 140)), 3), dtype=np.uint8)
              for _ in range(5)]
    categories = [["cup"], ["dog", "cat"], ["red car"], ["a"], ["b", "c", "d"]]
    alone = single.inference(images, categories=categories)
    together = batched.inference(images, categories=categories)
    assert [r["output_token_ids"] for r in together] == [r["output_token_ids"] for r in alone]
    assert [r["extracted_predictions"] for r in together] == [r["extracted_predictions"] for r in alone]
    assert [r["prompt"] for r in together] == [r["prompt"] for r in alone]


def test_a_failing_request_fails_alone(models) -> None:
    """A request whose image encoding fails (its patches cut short) and one given as an error: every
    other result intact and in its place."""
    single, batched = models
    made = requests(batched, "exact", 11, 6)
    broken = made[2][0]
    from dataclasses import replace

    short = replace(broken.image, pixel_patches=broken.image.pixel_patches[:-4])
    items = [(i, p) for i, (p, _) in enumerate(made)]
    items[2] = (2, replace(broken, image=short))
    items[4] = (4, ValueError("image 4 could not be read"))
    outcomes = dict(batched.run_many(items))
    assert sorted(outcomes) == list(range(6))
    assert isinstance(outcomes[2], BackendError) and "pixel_patches" in str(outcomes[2])
    assert isinstance(outcomes[4], ValueError)
    for i in (0, 1, 3, 5):
        alone = single.run(fresh(single, [made[i]])[0][0])
        assert outcomes[i]["output_token_ids"] == alone["output_token_ids"]


def test_bad_batch_settings_are_named(tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from rexedge.runtime.api import RexOmni

    for bad in (0, -2, 1.5, True):
        with pytest.raises(RexEdgeError, match="max_batch"):
            RexOmni(tiny_checkpoint, backend="torch", max_batch=bad)
    # a bundle exported before batching (its manifest allows batch 1) is refused with max_batch > 1
    import json
    import shutil

    from rexedge.runtime import manifest as schema
    from rexedge.runtime.bundle import manifest_digest

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / schema.MANIFEST).read_text())
    manifest[schema.GRAPHS][schema.DECODER][schema.DIMS][schema.BATCH_DIM] = [1, 1]
    manifest[schema.DIGEST_KEY] = manifest_digest(manifest)
    (old / schema.MANIFEST).write_text(json.dumps(manifest))
    RexOmni(old, max_context=256)   # batch 1 still loads
    with pytest.raises(BackendError, match="max_batch=2.*at most 1.*re-export"):
        RexOmni(old, max_batch=2, max_context=256)
    backend = load_backend("torch", tiny_checkpoint, max_context=256, max_batch=2)
    with pytest.raises(BackendError, match="slot 2"):
        backend.prefill(np.zeros((3, backend.config.hidden_size), np.float32), np.zeros((3, 3), np.int64), slot=2)
    with pytest.raises(BackendError, match="B in 1..2"):
        backend.step_batch(np.zeros((3, 1), np.int64), np.zeros((3, 3, 1), np.int64), np.ones(3, np.int64))
    with pytest.raises(RexEdgeError, match="steps at most 2"):
        RexOmni(None, backend=backend, max_batch=3)


def comparable(line: dict) -> dict:
    """A batch line without what differs from run to run (timings)."""
    return {k: v for k, v in line.items() if k not in ("inference_time", "generation_time", "tokens_per_second",
                                                       "timings")}


def test_batch_pipeline_keeps_max_batch_in_flight_with_the_same_lines(tiny_bundle: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """``run_batch`` with max_batch=3 over good and bad files: the lines of the batch-1 run, in input order,
    bad files failing alone; resumed after a partial run, every image once; the CLI's --max-batch."""
    import json

    from PIL import Image

    from rexedge.runtime.api import RexOmni
    from rexedge.runtime.cli import main
    from rexedge.runtime.pipelines.batch import run_batch

    rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
    root = tmp_path / "images"
    root.mkdir()
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(30, 120)), int(rng.integers(30, 120)), 3),
                                     dtype=np.uint8)).save(root / f"{i:02d}.png")
    (root / "03.png").write_bytes((root / "00.png").read_bytes()[:100])   # corrupt
    (root / "05.png").write_bytes(b"")                                     # empty
    options = dict(categories=["cup", "dog"], progress=False)
    run_batch(RexOmni(tiny_bundle, max_tokens=120), root, tmp_path / "one.jsonl", **options)
    batched = RexOmni(tiny_bundle, max_tokens=120, max_batch=3)
    summary = run_batch(batched, root, tmp_path / "three.jsonl", **options)
    assert (summary.done, summary.failed) == (5, 2)
    one, three = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
                  for name in ("one.jsonl", "three.jsonl"))
    assert [comparable(line) for line in three] == [comparable(line) for line in one]
    assert [line["status"] for line in three] == ["ok", "ok", "ok", "error", "ok", "error", "ok"]
    # resume: a partial batch-1 output, finished by the batched run
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(line) + "\n" for line in one[:3]))
    summary = run_batch(batched, root, partial, **options)
    assert (summary.skipped, summary.done + summary.failed) == (3, 4)
    assert [comparable(json.loads(line)) for line in partial.read_text().splitlines()] == \
        [comparable(line) for line in one]
    out = tmp_path / "cli.jsonl"
    argv = ["batch", str(root), "--model", str(tiny_bundle), "--categories", "cup,dog", "--max-new-tokens", "120",
            "--out", str(out), "--max-batch", "2"]
    assert main(argv) == 0
    assert "done 5, skipped 0, failed 2" in capsys.readouterr().err
    assert [comparable(json.loads(line)) for line in out.read_text().splitlines()] == [comparable(line) for line in one]
    assert main(argv[:-1] + ["0"]) == 2
    assert "max_batch" in capsys.readouterr().err


def test_streams_decode_the_frames_of_several_sources_together(tiny_bundle: Path) -> None:
    """Two in-order sources of different lengths: every frame of each once, in its source's order, each
    result the plain inference of that frame; rounds hold one frame per source still running."""
    from rexedge.runtime.api import RexOmni

    rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
    sources = [[rng.integers(0, 256, (int(rng.integers(30, 90)), int(rng.integers(30, 90)), 3), dtype=np.uint8)
                for _ in range(n)] for n in (3, 5)]
    model = RexOmni(tiny_bundle, max_tokens=30, max_batch=2, decoding="exact")   # answers of 30 tokens
    counting = CountingBackend(model.backend)
    model.loop.backend = counting
    with model.streams(sources, categories=["cup"]) as frames:
        results = list(frames)
    assert [(r.source, r.index) for r in results] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (1, 3), (1, 4)]
    single = RexOmni(tiny_bundle, max_tokens=30, decoding="exact")
    for r in results:
        [expected] = single.inference(sources[r.source][r.index], categories=["cup"])
        assert r.result["output_token_ids"] == expected["output_token_ids"]
    assert max(rows for rows, _, _ in counting.calls) == 2


def test_limits_are_named(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KV cache that cannot be allocated names max_batch, max_context and the size; a prompt that overflows
    the context names its image in a list."""
    from rexedge.runtime.api import RexOmni
    from rexedge.runtime.model import compact

    def no_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(compact.KVCache, "allocate", no_memory)
        with pytest.raises(BackendError, match=r"max_batch=8 slots x 1088 tokens needs .* GiB.*lower max_batch"):
            RexOmni(tiny_checkpoint, backend="torch", max_context=1024, max_batch=8)
    model = RexOmni(tiny_checkpoint, backend="torch", max_context=200, max_batch=2)
    small, large = np.zeros((40, 40, 3), np.uint8), np.zeros((400, 400, 3), np.uint8)
    with pytest.raises(RexEdgeError, match=r"images\[1\]: the prompt needs \d+ tokens but the backend holds 200"):
        model.inference([small, large, small], categories=["cup"])


class CallCounter:
    """Forwards to a backend and counts the calls of each method."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self.counts: dict[str, int] = {}

    def __getattr__(self, name: str):
        value = getattr(self._backend, name)
        if not callable(value):
            return value

        def counted(*args, **kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
            return value(*args, **kwargs)
        return counted


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_parallel_categories_share_one_prefill_and_merge_in_category_order(backend: str, tiny_bundle: Path,
                                                                          tiny_checkpoint: Path) -> None:
    """Each category's branch decodes what its one-category prompt decodes alone; the image is encoded and
    the shared prefix prefilled once (copied into the other slots); the answers merge in category order."""
    from rexedge.runtime.api import RexOmni

    path = tiny_bundle if backend == "ort" else tiny_checkpoint
    categories = ["cup", "door handle", "red car", "x"]
    options = dict(backend=backend, max_context=800, max_tokens=150, constrain_phrases=True)
    parallel = RexOmni(path, max_batch=4, parallel_categories=True, **options)
    alone = RexOmni(path, **options)
    for model in (parallel, alone):   # the random model would end at once: kept to its categories
        model.loop.heads = [KeepGoing(head, model.ids, groups=4) for head in model.loop.heads]
        model.loop.head = model.loop.heads[0]
    counter = CallCounter(parallel.backend)
    parallel.backend = parallel.loop.backend = counter
    ids = parallel.ids
    rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
    for _ in range(2):
        image = rng.integers(0, 256, (int(rng.integers(40, 130)), int(rng.integers(40, 130)), 3), dtype=np.uint8)
        counter.counts.clear()
        [result] = parallel.inference(image, categories=categories)
        assert counter.counts["encode_image"] == 1 and counter.counts["prefill"] == 1
        assert counter.counts["copy_slot"] == len(categories) - 1 and counter.counts["step"] == len(categories)
        expected: list[int] = []
        for name in categories:
            [one] = alone.inference(image, categories=[name])
            assert one["stop_reason"] == "eos"
            answer = one["output_token_ids"][:-1]
            expected += ([ids.comma, ids.space] if expected and answer else []) + answer
        assert result["output_token_ids"] == expected + [ids.im_end]
        assert result["stop_reason"] == "eos"
        answered = [name for name in categories if name in result["extracted_predictions"]]
        assert list(result["extracted_predictions"]) == answered and answered
        assert [d.phrase for d in result["detections"]] == sorted((d.phrase for d in result["detections"]),
                                                                  key=categories.index)
    with pytest.raises(RexEdgeError, match="5 categories need max_batch >= 5"):
        parallel.inference(image, categories=categories + ["y"])


def test_a_ray_actor_decodes_its_call_together(tiny_bundle: Path, tmp_path: Path) -> None:
    """``ImageActor`` (run here without Ray) with max_batch=3: its lines are the batch-1 lines, in path order."""
    import json

    from PIL import Image

    from rexedge.runtime.api import RexOmni
    from rexedge.runtime.pipelines.batch import image_record
    from rexedge.runtime.pipelines.ray_batch import ImageActor

    rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(30, 90)), 60, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    Path(paths[1]).write_bytes(b"not an image")
    request = {"task": "detection", "categories": ["cup"], "keypoint_type": None, "visual_prompt_boxes": None}
    actor = ImageActor(str(tiny_bundle), {"max_tokens": 40, "decoding": "exact", "max_batch": 3}, request,
                       str(tmp_path))
    lines = [json.loads(line) for line in actor({"path": np.array(paths)})["line"]]
    single = RexOmni(tiny_bundle, max_tokens=40, decoding="exact")
    expected = [json.loads(json.dumps(image_record(single, p, request))) for p in paths]   # as a line reads back
    assert [comparable(line) for line in lines] == [comparable(line) for line in expected]
    assert [line["status"] for line in lines] == ["ok", "error", "ok", "ok"]


def test_the_batched_benchmark_runs_its_forced_answers(tmp_path: Path) -> None:
    """``python -P -m rexedge.bench.batched`` on the tiny preset: every setting and both category modes decode
    the scenario's forced answer (the module raises otherwise); the report has the issue's table."""
    import json

    from rexedge.bench.batched import main

    out = tmp_path / "batched.json"
    assert main(["--model", "tiny", "--images", "3", "--max-batch", "1", "2", "--repeats", "1", "--warmup", "0",
                 "--categories-scenario", "448x448:6/3", "--pad-vs-group", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["max_batch"] for r in report["records"]] == [1, 2]
    assert report["records"][1]["backend_calls"] < report["records"][0]["backend_calls"]
    assert report["parallel_categories"]["categories"] == 3
    assert set(report["torch_pad_vs_group"]) == {"padded_ms", "grouped_ms"}
