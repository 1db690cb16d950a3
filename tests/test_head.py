"""The numpy head (penalty, greedy and sampled choice, restricted rows) against transformers' logits processors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.decode.head import Chooser, NumpyHead, Sampling, SamplingError

VOCAB, HIDDEN = 1531, 24          # odd sizes; the coordinate block below is 1,000 rows as in the model
COORD_START, COORD_STOP = 401, 1401
PENALTIES = (1.05, 1.3, 0.8)


def random_head(rng: np.random.Generator, penalty: float, **sampling) -> tuple[NumpyHead, list[int]]:
    """A head over a random table whose seen record holds a random prompt and output (ids repeat)."""
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    head = NumpyHead(table, Sampling(repetition_penalty=penalty, **sampling))
    prompt = rng.integers(0, VOCAB, int(rng.integers(1, 300)))
    output = rng.integers(0, VOCAB, int(rng.integers(0, 40))).tolist()
    head.reset(prompt)
    for token in output:
        head.observe(token)
    return head, prompt.tolist() + output


def reference_logits(head: NumpyHead, hidden: np.ndarray, history: list[int], penalty: float) -> torch.Tensor:
    """Full-vocabulary logits after transformers' repetition penalty over the whole history: [vocab] float32."""
    logits = torch.from_numpy(np.asarray(head.table) @ hidden)[None]
    return RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), logits)[0]


def hidden_towards(head: NumpyHead, rng: np.random.Generator, target: int) -> np.ndarray:
    """A random hidden state that (mostly) makes `target` the argmax, so the allowed set holds it."""
    row = np.asarray(head.table[target])
    return (3.0 * row / np.linalg.norm(row) + 0.3 * rng.standard_normal(HIDDEN)).astype(np.float32)


@pytest.mark.parametrize("penalty", PENALTIES)
def test_penalty_matches_transformers(penalty: float) -> None:
    rng = np.random.default_rng(int(penalty * 100))
    for _ in range(20):
        head, history = random_head(rng, penalty)
        logits = rng.standard_normal(VOCAB).astype(np.float32) * 4
        logits[rng.integers(0, VOCAB, 30)] = 0.0  # the sign test's edge
        expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), torch.from_numpy(logits)[None])[0]
        got = logits.copy()
        head.chooser.penalize(got, head.chooser.seen)
        np.testing.assert_array_equal(got, expected.numpy())


@pytest.mark.parametrize("penalty", PENALTIES)
def test_greedy_full_choice_and_confidence(penalty: float) -> None:
    rng = np.random.default_rng(7)
    for _ in range(30):
        head, history = random_head(rng, penalty)
        hidden = rng.standard_normal(HIDDEN).astype(np.float32)
        expected = reference_logits(head, hidden, history, penalty)
        token, prob = head.choose_full(hidden)
        assert token == int(expected.argmax())
        assert prob == pytest.approx(float(torch.softmax(expected.double(), 0)[token]), rel=1e-5)


def test_blocked_rows_are_never_chosen() -> None:
    rng = np.random.default_rng(8)
    for _ in range(30):
        head, history = random_head(rng, 1.05)
        blocked = rng.random(VOCAB) < 0.7
        hidden = rng.standard_normal(HIDDEN).astype(np.float32)
        expected = reference_logits(head, hidden, history, 1.05).masked_fill(torch.from_numpy(blocked), -torch.inf)
        token, prob = head.choose_full(hidden, blocked)
        assert not blocked[token] and token == int(expected.argmax())
        assert prob == pytest.approx(float(torch.softmax(expected.double(), 0)[token]), rel=1e-5)


def allowed_cases(rng: np.random.Generator, head: NumpyHead):
    """(kind, allowed ids, a call of the head) for random COORD (+ extra ids) and CHOICE steps."""
    if rng.random() < 0.5:
        outside = [i for i in range(VOCAB) if not COORD_START <= i < COORD_STOP]
        extra = tuple(int(i) for i in rng.choice(outside, int(rng.integers(0, 3)), replace=False))
        allowed = list(range(COORD_START, COORD_STOP)) + list(extra)
        return allowed, lambda hidden: head.choose_range(hidden, COORD_START, COORD_STOP, extra)
    ids = tuple(int(i) for i in rng.choice(VOCAB, int(rng.integers(1, 6)), replace=False))
    return list(ids), lambda hidden: head.choose_ids(hidden, ids)


@pytest.mark.parametrize("penalty", PENALTIES)
def test_structured_choice_is_the_model_choice_when_allowed(penalty: float) -> None:
    """Exact and structured decoding agree whenever the model's own (penalized) argmax is allowed;
    otherwise the structured pick is the best allowed token; the confidence is the softmax over the allowed rows."""
    rng = np.random.default_rng(int(penalty * 1000))
    agreed = 0
    for case in range(200):
        head, history = random_head(rng, penalty)
        allowed, choose = allowed_cases(rng, head)
        # half the cases lean towards an allowed row, so its argmax is usually the full argmax
        hidden = (hidden_towards(head, rng, int(rng.choice(allowed))) if case % 2
                  else rng.standard_normal(HIDDEN).astype(np.float32))
        full = reference_logits(head, hidden, history, penalty)
        restricted = full[allowed].double()
        token, prob = choose(hidden)
        if int(full.argmax()) in allowed:
            assert token == int(full.argmax())
            agreed += 1
        assert token == allowed[int(restricted.argmax())]
        assert prob == pytest.approx(float(torch.softmax(restricted, 0)[allowed.index(token)]), rel=1e-5)
        # the exact-mode call on the same state picks the unrestricted argmax
        assert head.choose_full(hidden)[0] == int(full.argmax())
    assert agreed >= 80, "too few cases had the full argmax inside the allowed set"


SAMPLINGS = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=25),
    dict(temperature=0.9, top_p=0.8),
    dict(temperature=1.0, top_k=40, top_p=0.6),
    dict(temperature=2.0, top_k=3, top_p=0.99),
]


@pytest.mark.parametrize("settings", SAMPLINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_sampling_distribution_matches_transformers_warpers(settings: dict) -> None:
    rng = np.random.default_rng(3)
    warpers = [TemperatureLogitsWarper(settings["temperature"])]
    if settings.get("top_k"):
        warpers.append(TopKLogitsWarper(settings["top_k"]))
    if settings.get("top_p", 1.0) < 1.0:
        warpers.append(TopPLogitsWarper(settings["top_p"]))
    for _ in range(10):
        head, history = random_head(rng, 1.05, seed=int(rng.integers(1 << 30)), **settings)
        hidden = (2 * rng.standard_normal(HIDDEN)).astype(np.float32)
        scores = reference_logits(head, hidden, history, 1.05)[None]
        for warper in warpers:
            scores = warper(torch.tensor([history]), scores)
        expected = torch.softmax(scores[0].double(), 0).numpy()

        logits = np.asarray(head.table) @ hidden
        head.chooser.penalize(logits, head.chooser.seen)
        got = head.chooser.distribution(logits)
        np.testing.assert_array_equal(got > 0, expected > 0)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-12)

        # draws stay inside the support, and report the temperature-1 softmax of the penalized logits
        penalized = torch.from_numpy(logits).double()
        for _ in range(20):
            token, prob = head.choose_full(hidden)
            assert expected[token] > 0
            assert prob == pytest.approx(float(torch.softmax(penalized, 0)[token]), rel=1e-5)


def test_seeded_sampling_repeats() -> None:
    table = np.random.default_rng(4).standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    hidden = np.random.default_rng(5).standard_normal(HIDDEN).astype(np.float32)

    def draws(seed: int) -> list[int]:
        head = NumpyHead(table, Sampling(temperature=1.5, seed=seed))
        head.reset(np.arange(10))
        return [head.choose_full(hidden)[0] for _ in range(30)]

    assert draws(11) == draws(11)
    assert len(set(draws(11))) > 1


def test_head_calls_allocate_nothing_vocabulary_sized() -> None:
    """Per token only the pre-allocated buffers are used (numpy's own scratch is a few hundred bytes)."""
    vocab = 16384
    rng = np.random.default_rng(6)
    head = NumpyHead(rng.standard_normal((vocab, 16)).astype(np.float32), Sampling())
    head.reset(rng.integers(0, vocab, 100))
    hidden = rng.standard_normal(16).astype(np.float32)
    blocked = rng.random(vocab) < 0.5
    calls = [lambda: head.choose_full(hidden), lambda: head.choose_full(hidden, blocked),
             lambda: head.choose_range(hidden, 3000, 4000, (7, 11)), lambda: head.choose_ids(hidden, (3, 9, 12000))]
    tracemalloc.start()
    try:
        for call in calls * 50:
            call()  # fill the caches first (numpy keeps freed small buffers until its cache is full)
        for call in calls:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(20):
                call()
            current, peak = tracemalloc.get_traced_memory()
            # a boolean mask over the vocabulary alone would be 16 KiB, the 1,000 coordinate logits
            # 4 KiB; what is left is small Python objects (ints, tuples, ctypes arguments)
            assert peak - before < 3500 and current - before < 1000
    finally:
        tracemalloc.stop()


def test_chooser_requires_sampling_for_a_distribution() -> None:
    with pytest.raises(SamplingError, match="temperature 0 means greedy"):
        Chooser(10, Sampling()).distribution(np.zeros(10, np.float32))


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
])
def test_bad_sampling_settings(settings: dict, message: str) -> None:
    with pytest.raises(SamplingError, match=message) as error:
        Sampling(**settings)
    assert isinstance(error.value, RexEdgeError)


def test_long_id_lists_grow_the_buffers() -> None:
    """A constrained phrase's branch point lists one id per category (80 for COCO): more than the 64 the
    buffers start with; the choice is still the best listed row, penalty applied."""
    rng = np.random.default_rng(8)
    table = rng.standard_normal((300, 12), dtype=np.float32)
    hidden = rng.standard_normal(12, dtype=np.float32)
    head = NumpyHead(table, Sampling(repetition_penalty=1.3))
    head.reset(np.arange(0, 300, 7))
    for ids in (tuple(int(i) for i in rng.choice(300, 90, replace=False)), (5, 17, 200)):
        logits = table[list(ids)] @ hidden
        seen = np.array([i % 7 == 0 for i in ids])
        logits = np.where(seen, np.where(logits > 0, logits / 1.3, logits * 1.3), logits)
        token, prob = head.choose_ids(hidden, ids)
        assert token == ids[int(np.argmax(logits))]
        assert prob == pytest.approx(float(np.exp(logits.max()) / np.exp(logits).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="at least one listed id"):
        head.choose_ids(hidden, ())


def test_small_products_run_on_one_blas_thread_and_the_full_head_on_all(monkeypatch: pytest.MonkeyPatch) -> None:
    from threadpoolctl import threadpool_info

    def blas_threads() -> int:
        return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    default = blas_threads()
    threads_seen: list[int] = []
    real_dot = np.dot

    def spying_dot(*args, **kwargs):
        threads_seen.append(blas_threads())
        return real_dot(*args, **kwargs)

    rng = np.random.default_rng(7)
    head = NumpyHead(rng.standard_normal((1237, 33)).astype(np.float32), Sampling())
    head.reset(np.array([3, 5]))
    hidden = rng.standard_normal(33).astype(np.float32)
    monkeypatch.setattr(np, "dot", spying_dot)
    head.choose_range(hidden, 100, 1100, (7, 9))
    head.choose_ids(hidden, (1, 2, 3))
    small = list(threads_seen)
    threads_seen.clear()
    head.choose_full(hidden)
    assert small and all(t == 1 for t in small), small
    assert threads_seen == [default]
    assert blas_threads() == default  # restored after each small product
