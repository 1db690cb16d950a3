"""Micro-benchmarks of the hot pieces (pytest-benchmark): preprocessing, the CPU restricted head, one ort step.

Run with the others (the grammar's are in test_grammar_bench.py):

    python -m pytest bench -q --benchmark-columns=median,iqr,rounds

The default test run (``python -m pytest -q tests``) never collects bench/. Each benchmark
checks its output against an independent expectation, so a fast wrong answer fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from rexedge.bench.scenarios import synthetic_image
from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.decode.head import NumpyHead, Sampling
from rexedge.runtime.request.preprocess import preprocess

REAL = RexOmniConfig.preset("rex-omni-3b")
CPU_BENCH = RexOmniConfig.preset("cpu-bench")


@pytest.mark.parametrize("size, image_tokens", [((448, 448), 256), ((1440, 810), 1479)], ids=["448x448", "1440x810"])
def test_preprocess(benchmark, size: tuple[int, int], image_tokens: int) -> None:
    image = synthetic_image(size)
    out = benchmark(preprocess, image, cfg=REAL)
    assert out.num_image_tokens == image_tokens
    assert out.pixel_patches.shape == (image_tokens * 4, REAL.patch_dim)


@pytest.fixture(scope="module")
def head_case() -> tuple[NumpyHead, np.ndarray, np.ndarray]:
    """A head over the real vocabulary at the cpu-bench width (151,936 x 768 float32: 467 MB)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((CPU_BENCH.vocab_size, CPU_BENCH.hidden_size), dtype=np.float32)
    head = NumpyHead(table, Sampling())
    head.reset(rng.integers(0, CPU_BENCH.vocab_size, size=300))
    return head, table, rng.standard_normal(CPU_BENCH.hidden_size, dtype=np.float32)


COORDS = (150643, 151643)


def test_head_full_vocabulary(benchmark, head_case) -> None:
    head, table, hidden = head_case
    token, _ = benchmark(head.choose_full, hidden)
    logits = table.astype(np.float64) @ hidden
    seen = head.chooser.seen
    logits[seen] = np.where(logits[seen] > 0, logits[seen] / 1.05, logits[seen] * 1.05)
    assert token == int(logits.argmax())
    benchmark.extra_info["rows"] = table.shape[0]


def test_head_coordinate_rows(benchmark, head_case) -> None:
    head, table, hidden = head_case
    start, stop = COORDS
    token, _ = benchmark(head.choose_range, hidden, start, stop)
    logits = table[start:stop].astype(np.float64) @ hidden
    seen = head.chooser.seen[start:stop]
    logits[seen] = np.where(logits[seen] > 0, logits[seen] / 1.05, logits[seen] * 1.05)
    assert token == start + int(logits.argmax())
    benchmark.extra_info["rows"] = stop - start


def test_head_choice(benchmark, head_case) -> None:
    head, table, hidden = head_case
    ids = (11, 151649)
    token, _ = benchmark(head.choose_ids, hidden, ids)
    assert token in ids


@pytest.fixture(scope="module", params=["tiny", "hidden512x8"])
def ort_backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """An ort backend on a tiny bundle (the per-call floor) and on decode_context's bigger random model."""
    from rexedge.bench.decode_context import BENCH_CONFIG
    from rexedge.export.bundle import export_bundle
    from rexedge.export.fixtures.tiny import write_tiny_checkpoint
    from rexedge.runtime.backends import load_backend

    tmp = tmp_path_factory.mktemp(request.param)
    checkpoint = write_tiny_checkpoint(tmp / "checkpoint", "tiny" if request.param == "tiny" else BENCH_CONFIG)
    bundle = export_bundle(checkpoint, tmp / "bundle", progress=False)
    return load_backend("ort", bundle, max_context=1024)


CONTEXT = 256


def test_ort_decode_step(benchmark, ort_backend) -> None:
    """One single-token step after a 256-token context (re-prefilled, untimed, before the cache fills)."""
    backend = ort_backend
    hidden_size = backend.config.hidden_size
    rng = np.random.default_rng(1)
    embeds = rng.standard_normal((CONTEXT, hidden_size), dtype=np.float32) * 0.05
    token = np.array([7], np.int64)
    position = np.zeros((3, 1), np.int64)

    def refill() -> None:
        if backend.cache_length == 0 or backend.cache_length >= backend.max_context - 1:
            backend.prefill(embeds, np.tile(np.arange(CONTEXT, dtype=np.int64), (3, 1)))
        position[:] = backend.cache_length

    def step() -> np.ndarray:
        return backend.step(token, position)

    benchmark.pedantic(step, setup=refill, rounds=200, warmup_rounds=10)
    # the same step twice from the same cache gives the same hidden state
    backend.prefill(embeds, np.tile(np.arange(CONTEXT, dtype=np.int64), (3, 1)))
    position[:] = CONTEXT
    first = backend.step(token, position).copy()
    backend.prefill(embeds, np.tile(np.arange(CONTEXT, dtype=np.int64), (3, 1)))
    assert np.array_equal(backend.step(token, position), first) and np.isfinite(first).all()
    benchmark.extra_info["context"] = CONTEXT
