"""Restricted head kernel == its torch reference, and the reference == rexedge.runtime.decode.head.NumpyHead.

Runs under TRITON_INTERPRET=1 on the CPU (conftest) and natively when CUDA is present.
Fresh random inputs per case, odd sizes, outputs poisoned before every launch.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from rexedge.kernels import KernelInputError  # noqa: E402
from rexedge.kernels.restricted_head import restricted_head, restricted_head_reference  # noqa: E402
from rexedge.runtime.decode.head import NumpyHead, Sampling  # noqa: E402

# compiled on a GPU, under the interpreter on a CPU (conftest): one or the other per process
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


def _inputs(seed: int, batch: int, vocab: int, hidden: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(seed)
    table = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dtype).to(device)
    h = torch.randn(batch, hidden, generator=g).to(dtype).to(device)
    seen = (torch.rand(batch, vocab, generator=g) < 0.3).to(device)
    return table, h, seen, g


def _poisoned(batch: int, n: int, device: str):
    return (torch.full((batch,), -7, dtype=torch.int64, device=device),
            torch.full((batch,), float("nan"), device=device),
            torch.full((batch, n), float("nan"), device=device))


# (batch, vocab, hidden, start, stop, extra ids, dtype): coordinate-like range + extras, CHOICE ids,
# a long hidden with few rows, and a full vocabulary spanning many row blocks.
CASES = [
    (2, 1237, 96, 150, 1150, (3, 1200, 77), torch.float32),
    (1, 1237, 96, 150, 1150, (), torch.float16),
    (3, 515, 96, 0, 0, (11, 220, 4, 500, 9, 300, 123), torch.float16),
    (1, 64, 2048, 40, 47, (), torch.float32),
    (1, 64, 2048, 0, 0, (1, 2, 3, 60, 61, 62, 63), torch.float16),
    (2, 1237, 96, 0, 1237, (), torch.float32),
    (1, 1237, 96, 0, 1237, (), torch.float16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,vocab,hidden,start,stop,extra,dtype", CASES)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_kernel_matches_reference(device, batch, vocab, hidden, start, stop, extra, dtype, temperature):
    seed = zlib.crc32(repr((batch, vocab, hidden, start, stop, extra, dtype, temperature)).encode())
    table, h, seen, g = _inputs(seed, batch, vocab, hidden, dtype, device)
    ids = torch.tensor(extra, dtype=torch.int64, device=device) if extra else None
    n = stop - start + len(extra)
    noise = torch.rand(batch, n, generator=g).to(device) if temperature else None
    penalty = 1.0 + float(torch.rand(1, generator=g)) * 0.5
    token, prob, logits = _poisoned(batch, n, device)
    restricted_head(h, table, seen, start, stop, ids, penalty, temperature, noise,
                    token_out=token, prob_out=prob, logits_out=logits)
    ref_token, ref_prob, ref_logits = restricted_head_reference(h.cpu(), table.cpu(), seen.cpu(), start, stop,
                                                                None if ids is None else ids.cpu(), penalty,
                                                                temperature, None if noise is None else noise.cpu())
    assert torch.isfinite(logits).all() and torch.isfinite(prob).all()
    torch.testing.assert_close(logits.cpu(), ref_logits, rtol=1e-5, atol=1e-5)
    assert token.cpu().tolist() == ref_token.tolist()
    torch.testing.assert_close(prob.cpu(), ref_prob, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_blocked_rows_are_never_chosen(device, dtype, temperature):
    """A phrase step: rows blocked at random and whole row blocks blocked (the coordinate rows), with the
    unblocked best rows forced into the blocked set so that blocking changes the answer."""
    seed = zlib.crc32(repr((dtype, temperature, "blocked")).encode())
    batch, vocab = 2, 1237
    table, h, seen, g = _inputs(seed, batch, vocab, 96, dtype, device)
    blocked = torch.rand(batch, vocab, generator=g) < 0.2
    blocked[:, 128:700] = True                                   # row blocks 2..10 whole, block 1 and 10 in part
    blocked[torch.arange(batch), torch.argmax(h.float().cpu() @ table.float().cpu().T, dim=-1)] = True
    blocked = blocked.to(device)
    noise = torch.rand(batch, vocab, generator=g).to(device) if temperature else None
    token, prob, logits = _poisoned(batch, vocab, device)
    restricted_head(h, table, seen, 0, vocab, None, 1.3, temperature, noise, blocked,
                    token_out=token, prob_out=prob, logits_out=logits)
    ref_token, ref_prob, ref_logits = restricted_head_reference(h.cpu(), table.cpu(), seen.cpu(), 0, vocab, None, 1.3,
                                                                temperature, None if noise is None else noise.cpu(),
                                                                blocked=blocked.cpu())
    assert not blocked.cpu()[torch.arange(batch), token.cpu()].any()
    assert token.cpu().tolist() == ref_token.tolist()
    torch.testing.assert_close(logits.cpu(), ref_logits, rtol=1e-5, atol=1e-5)   # -inf where blocked, on both
    torch.testing.assert_close(prob.cpu(), ref_prob, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_take_the_first_row_across_blocks(device):
    """Equal best logits in different row blocks: the lowest row wins, as numpy's argmax."""
    table, h, seen, _ = _inputs(5, 1, 700, 96, torch.float32, device)
    seen.zero_()
    best = int(torch.argmax(table @ h[0]))
    for row in (best, 100, 650):  # rows 100 and 650 live in later / earlier blocks than `best` may
        table[row] = table[best]
    first = min(best, 100, 650)
    token, prob, _ = _poisoned(1, 700, device)
    restricted_head(h, table, seen, 0, 700, None, 1.05, token_out=token, prob_out=prob)
    assert int(token[0]) == first == int(restricted_head_reference(h, table, seen, 0, 700)[0][0])


@pytest.mark.parametrize("case", ["range", "range+extra", "ids", "full", "full+blocked"])
def test_reference_matches_numpy_head_greedy(case):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    vocab, hidden = 1311, 96
    table = rng.standard_normal((vocab, hidden), dtype=np.float32)
    h = rng.standard_normal(hidden, dtype=np.float32)
    prompt = rng.choice(vocab, size=300, replace=False)
    head = NumpyHead(table, Sampling(repetition_penalty=1.2))
    head.reset(prompt)
    seen = torch.zeros(1, vocab, dtype=torch.bool)
    seen[0, torch.from_numpy(prompt)] = True
    if case == "range":
        start, stop, extra = 201, 1201, ()
        expected = head.choose_range(h, start, stop)
    elif case == "range+extra":
        start, stop, extra = 201, 1201, (5, 1300)
        expected = head.choose_range(h, start, stop, extra)
    elif case == "ids":
        start, stop, extra = 0, 0, tuple(int(i) for i in rng.choice(vocab, size=7, replace=False))
        expected = head.choose_ids(h, extra)
    else:
        start, stop, extra = 0, vocab, ()
        blocked = rng.random(vocab) < 0.5 if case == "full+blocked" else None
        expected = head.choose_full(h, blocked)
    ids = torch.tensor(extra, dtype=torch.int64) if extra else None
    blocked_rows = None if case != "full+blocked" else torch.from_numpy(blocked)[None]
    token, prob, _ = restricted_head_reference(torch.from_numpy(h)[None], torch.from_numpy(table), seen, start, stop,
                                               ids, 1.2, blocked=blocked_rows)
    assert int(token[0]) == expected[0]
    assert float(prob[0]) == pytest.approx(expected[1], rel=1e-5)


@pytest.mark.parametrize("sampling", [Sampling(temperature=0.8, repetition_penalty=1.1),
                                      Sampling(temperature=1.3, top_k=3),
                                      Sampling(temperature=0.9, top_p=0.7),
                                      Sampling(temperature=1.0, top_k=5, top_p=0.8)])
def test_reference_sampling_distribution_matches_numpy_head(sampling):
    """Same distribution of draws over 7 CHOICE ids (4,000 draws each; 5 sigma is about 0.04)."""
    rng = np.random.default_rng(3)
    vocab, hidden, draws = 50, 32, 4000
    table = rng.standard_normal((vocab, hidden), dtype=np.float32) * 0.4
    h = rng.standard_normal(hidden, dtype=np.float32)
    ids = (3, 9, 14, 22, 30, 41, 49)
    head = NumpyHead(table, Sampling(**{**sampling.__dict__, "seed": 11}))
    head.reset(np.array([9, 30]))
    numpy_draws = [head.choose_ids(h, ids)[0] for _ in range(draws)]
    seen = torch.zeros(draws, vocab, dtype=torch.bool)
    seen[:, [9, 30]] = True
    g = torch.Generator().manual_seed(12)
    token, _, _ = restricted_head_reference(torch.from_numpy(h).expand(draws, hidden), torch.from_numpy(table), seen,
                                            0, 0, torch.tensor(ids), sampling.repetition_penalty, sampling.temperature,
                                            torch.rand(draws, len(ids), generator=g), sampling.top_k, sampling.top_p)
    freq_numpy = np.array([numpy_draws.count(i) for i in ids]) / draws
    freq_torch = np.array([(token == i).sum().item() for i in ids]) / draws
    assert np.abs(freq_numpy - freq_torch).max() < 0.04, (freq_numpy, freq_torch)


def test_launcher_rejects_bad_inputs():
    table, h, seen, _ = _inputs(0, 1, 100, 32, torch.float32, "cpu")
    with pytest.raises(KernelInputError, match="table must be"):
        restricted_head(h, table[:, :16], seen, 0, 10)
    with pytest.raises(KernelInputError, match="seen must be"):
        restricted_head(h, table, seen[:, :50], 0, 10)
    with pytest.raises(KernelInputError, match="start <= stop"):
        restricted_head(h, table, seen, 20, 10)
    with pytest.raises(KernelInputError, match="empty"):
        restricted_head(h, table, seen, 5, 5)
    with pytest.raises(KernelInputError, match="sampling needs noise"):
        restricted_head(h, table, seen, 0, 10, temperature=0.5)
    with pytest.raises(KernelInputError, match="extra_ids"):
        restricted_head(h, table, seen, 0, 10, torch.tensor([1, 2], dtype=torch.int32))
