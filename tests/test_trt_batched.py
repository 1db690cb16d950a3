"""Batched decoding on the trt flavour: the per-row key mask of the graph, and the trt backend's cache
bookkeeping (one shared cache length, rows with holes, prefills copied into rows, compaction) run on
the CPU through stand-in engines (tests/trt_stand_in.py: the same graphs on ONNX Runtime behind
TensorRT's context methods). With TensorRT and a GPU (skipped otherwise): the real engines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_batched_decoding import CountingBackend, decode_all, fresh, requests
from test_trt_backend import _gpu_ready
from trt_stand_in import stand_in_engines

from rexedge.export.bundle import export_bundle
from rexedge.runtime import manifest as schema
from rexedge.runtime.backends import BackendError, load_backend
from rexedge.runtime.backends.trt import TrtBackend
from rexedge.runtime.bundle import load_bundle, manifest_digest


@pytest.fixture(scope="module")
def trt_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("trt_batched") / "bundle", flavour="trt",
                         progress=False)


def _run(session: ort.InferenceSession, layers: int, past: list[np.ndarray], embeds: np.ndarray,
         positions: np.ndarray, key_valid: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    feeds = {"inputs_embeds": embeds, "position_ids": positions, "key_valid": key_valid}
    for i in range(layers):
        feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = past[2 * i], past[2 * i + 1]
    names = ["hidden_states"] + [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    hidden, *present = session.run(names, feeds)
    return hidden, present


def test_rows_with_holes_give_what_each_row_gives_alone(trt_bundle: Path) -> None:
    """B rows sharing a cache length P, each with its own real slots among holes (holes hold large finite
    garbage), T new tokens: row b's hidden states and new keys / values == row b run alone on its real slots."""
    bundle = load_bundle(trt_bundle)
    cfg = bundle.config
    layers, kvh, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    session = ort.InferenceSession(str(trt_bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng()   # fresh inputs every run
    rows, past, tokens = 3, int(rng.integers(17, 31)), int(rng.integers(2, 6))
    valid = rng.random((rows, past)) < 0.6
    valid[1] = False                           # a row holding nothing yet
    valid[2, :] = True                         # and one without holes
    cache = [rng.standard_normal((rows, kvh, past, d)).astype(np.float32) for _ in range(2 * layers)]
    for array in cache:
        array[~np.broadcast_to(valid[:, None, :, None], array.shape)] = 1e4   # garbage a mask must hide
    embeds = (rng.standard_normal((rows, tokens, cfg.hidden_size)) * 0.05).astype(np.float32)
    positions = rng.integers(0, 300, (3, rows, tokens)).astype(np.int64)
    key_valid = np.concatenate([valid, np.ones((rows, tokens), bool)], axis=1)
    hidden, present = _run(session, layers, cache, embeds, positions, key_valid)
    assert hidden.shape == (rows, tokens, cfg.hidden_size)
    for b in range(rows):
        mine = [array[b:b + 1][:, :, valid[b]] for array in cache]
        alone, alone_present = _run(session, layers, mine, embeds[b:b + 1], positions[:, b:b + 1],
                                    np.ones((1, int(valid[b].sum()) + tokens), bool))
        np.testing.assert_allclose(hidden[b], alone[0], rtol=1e-5, atol=1e-5)
        for got, expected, given in zip(present, alone_present, cache):
            assert got.shape == (rows, kvh, past + tokens, d)
            np.testing.assert_allclose(got[b, :, past:], expected[0, :, -tokens:], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(got[b, :, :past], given[b])


def _backend(bundle: Path, max_batch: int, max_context: int) -> TrtBackend:
    return TrtBackend.from_engines(bundle, stand_in_engines(bundle), max_context=max_context, max_batch=max_batch)


@pytest.mark.parametrize("max_context", [1024, 200])
def test_batched_trt_decoding_on_stand_ins_is_each_request_alone(trt_bundle: Path, max_context: int) -> None:
    """Exact mode through the backend's real bookkeeping: every sequence of a batch (mixed image sizes,
    prompt and answer lengths, slots refilled mid-run) gives the tokens it gives decoded alone; with a small
    max_context the rows are compacted while others decode."""
    from rexedge.runtime.api import RexOmni

    single = RexOmni(None, backend=_backend(trt_bundle, 1, max_context), max_tokens=150)
    backend = _backend(trt_bundle, 3, max_context)
    batched = RexOmni(None, backend=backend, max_tokens=150, max_batch=3)
    compactions, widenings = [], []
    slots = backend._slots
    compact, widen = slots.compact, slots.widen
    slots.compact = lambda: (compactions.append(slots.past), compact())[1]
    slots.widen = lambda past: (widenings.append(past), widen(past))[1]
    made = requests(batched, "exact", 5, 7)
    counting = CountingBackend(batched.backend)
    finished = decode_all(batched, counting, made, "exact", 3, keep_going=False)
    alone = dict(decode_all(single, single.backend, fresh(single, made), "exact", 1, keep_going=False))
    assert sorted(key for key, _ in finished) == list(range(7))
    for key, gen in finished:
        assert gen.token_ids == alone[key].token_ids, key
        assert gen.stop_reason == alone[key].stop_reason
    assert len(counting.prefills) == 7 and any(sum(c > 0 for c in counts) == 3 for _, _, counts in counting.calls)
    assert [i for i, slot in enumerate(counting.prefills) if i >= 3], "no slot was refilled"
    assert widenings, "no prompt was longer than the shared cache length"
    if max_context == 200:
        assert compactions, "the rows were never compacted"
    # every decoder call stayed inside the engines' profiles (the stand-in checks each shape) and batched calls
    # carried every row in use
    decode_calls = backend._contexts["decode"].calls
    assert max(call["inputs_embeds"][0] for call in decode_calls) == 3


def test_jump_forward_runs_and_branches_on_stand_ins(trt_bundle: Path) -> None:
    """Structured mode (rows append forced runs of different lengths, longer than one decode call) and
    parallel categories (a prefill copied into other slots, each slot's own prompt appended alone): the
    ort backend's results."""
    from rexedge.runtime.api import RexOmni

    backend = _backend(trt_bundle, 3, 512)
    model = RexOmni(None, backend=backend, max_tokens=60, max_batch=3, constrain_phrases=True)
    branches = RexOmni(None, backend=_backend(trt_bundle, 3, 512), max_tokens=60, max_batch=3,
                       parallel_categories=True)
    reference = RexOmni(None, backend=TrtBackend.from_engines(trt_bundle, stand_in_engines(trt_bundle),
                                                              max_context=512), max_tokens=60, constrain_phrases=True)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (int(rng.integers(40, 120)), int(rng.integers(40, 120)), 3), dtype=np.uint8)
              for _ in range(4)]
    categories = ["cup", "door handle of the red cupboard " * 5, "x"]
    got = model.inference(images, categories=categories)
    for image, result in zip(images, got):
        [expected] = reference.inference(image, categories=categories)
        assert result["output_token_ids"] == expected["output_token_ids"]
    [split] = branches.inference(images[0], categories=categories[:2])
    reference.constrain_phrases = False
    expected = [reference.inference(images[0], categories=[c])[0] for c in categories[:2]]
    assert [d for d in split["extracted_predictions"]] == [k for e in expected for k in e["extracted_predictions"]]


def test_old_bundles_and_engines_are_refused_with_max_batch(trt_bundle: Path, tmp_path: Path) -> None:
    """A trt bundle exported before batched decoding (no key_valid input, decoder batch 1) loads for one
    sequence only; engines recorded for fewer rows than asked are refused naming both numbers."""
    old = tmp_path / "old"
    shutil.copytree(trt_bundle, old)
    manifest = json.loads((old / schema.MANIFEST).read_text())
    manifest[schema.GRAPHS][schema.DECODER][schema.DIMS][schema.BATCH_DIM] = [1, 1]
    manifest[schema.DIGEST_KEY] = manifest_digest(manifest)
    (old / schema.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match=r"max_batch=2, but the decoder of .* steps at most 1 .*re-export"):
        TrtBackend.from_engines(old, stand_in_engines(old), max_context=128, max_batch=2)
    with pytest.raises(BackendError, match=r"max_batch=2, but the decoder .*re-export"):
        load_backend("trt", old, device="cuda", max_batch=2)   # before TensorRT is looked for
    TrtBackend.from_engines(old, stand_in_engines(old), max_context=128)
    with pytest.raises(BackendError, match=r"max_batch=4, but the engines of .* built for at most 2 row.*rebuild"):
        TrtBackend.from_engines(trt_bundle, stand_in_engines(trt_bundle, max_batch=2), max_context=128, max_batch=4)
    with pytest.raises(BackendError, match="step_batch needs max_batch > 1"):
        _backend(trt_bundle, 1, 64).step_batch(np.zeros((1, 1), np.int64), np.zeros((3, 1, 1), np.int64),
                                               np.ones(1, np.int64))


@pytest.mark.skipif(not _gpu_ready(), reason="needs TensorRT and a CUDA GPU")
def test_batched_trt_engines_give_each_request_its_tokens_alone(trt_bundle: Path, tmp_path: Path) -> None:
    """The real engines (fp16): a batch of 3 decodes each request as the batch-1 trt backend does (exact mode;
    fp16 rows summed in another order may part late in a long answer, so the first 20 tokens are compared)."""
    from rexedge.export.tensorrt.engine import build_engines
    from rexedge.runtime.api import RexOmni

    bundle = tmp_path / "bundle"
    shutil.copytree(trt_bundle, bundle)
    record = build_engines(bundle, "fp16", progress=False)
    assert record["max_batch"] >= 3
    single = RexOmni(bundle, backend="trt", device="cuda", max_context=512, max_tokens=60)
    batched = RexOmni(bundle, backend="trt", device="cuda", max_context=512, max_tokens=60, max_batch=3)
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (int(rng.integers(40, 160)), int(rng.integers(40, 160)), 3), dtype=np.uint8)
              for _ in range(5)]
    got = batched.inference(images, categories=["cup", "door handle"])
    for image, result in zip(images, got):
        [expected] = single.inference(image, categories=["cup", "door handle"])
        assert result["output_token_ids"][:20] == expected["output_token_ids"][:20]
