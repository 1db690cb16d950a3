"""The torch backend's CUDA path.

On the CPU: the backend choice and its error without CUDA, and the two plain-torch pieces a
captured step runs (the decoder step with the decode-attention kernel, the device head's
choice) under TRITON_INTERPRET=1 against the compact model and the head reference.
With CUDA (skipped otherwise): the same tokens as the CPU torch backend, exact mode, fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from rexedge.export.checkpoint import load_model  # noqa: E402
from rexedge.export.model import KVCache  # noqa: E402
from rexedge.kernels.restricted_head import restricted_head_reference  # noqa: E402
from rexedge.runtime.backends import BackendError, load_backend  # noqa: E402
from rexedge.runtime.backends.torch_cuda import MAX_APPEND, choose_on_device, decode_step  # noqa: E402
from rexedge.runtime.head import Sampling  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(CUDA, reason="checks the error raised where CUDA is missing")
def test_cuda_request_without_cuda_is_a_backend_error(tiny_checkpoint: Path) -> None:
    with pytest.raises(BackendError, match="no CUDA device"):
        load_backend("torch", tiny_checkpoint, device="cuda")
    with pytest.raises(BackendError, match="no CUDA device"):
        load_backend("torch", tiny_checkpoint, device="cuda:1", dtype="float32")
    assert type(load_backend("torch", tiny_checkpoint, device="cpu", max_context=32)).__name__ == "TorchBackend"


def _inputs(cache_length: int, tokens: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    packed = torch.zeros(1 + 4 * MAX_APPEND, dtype=torch.int64)
    packed[0] = cache_length
    packed[1:1 + tokens.size] = torch.from_numpy(tokens)
    packed[1 + MAX_APPEND:].view(3, MAX_APPEND)[:, :tokens.size] = torch.from_numpy(positions)
    return packed


def test_decode_step_matches_the_compact_model(tiny_checkpoint: Path) -> None:
    """The captured step's body (kernel attention, packed inputs) == model.decode, over k = 1, 3, 1, 2."""
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    cfg = model.config
    rng = np.random.default_rng(21)
    cache, expected_cache = (KVCache.allocate(cfg, 1, 70) for _ in range(2))
    prompt = torch.from_numpy(rng.integers(0, cfg.vocab_size, 13))
    positions = torch.from_numpy(np.stack([np.arange(13), np.arange(13) // 2, np.arange(13) % 5]))[:, None]
    with torch.inference_mode():
        for c in (cache, expected_cache):
            model.decode(model.embed(prompt)[None], positions, c, torch.arange(13), kv_length=13)
        length = 13
        for k in (1, 3, 1, 2):
            tokens = rng.integers(0, cfg.vocab_size, k)
            pos = np.repeat((np.arange(k) + length + 4)[None], 3, axis=0)
            hidden = decode_step(model, cache, _inputs(length, tokens, pos), k, context_bound=70)
            expected = model.decode(model.embed(torch.from_numpy(tokens))[None], torch.from_numpy(pos)[:, None],
                                    expected_cache, torch.arange(length, length + k), kv_length=length + k)[0, -1]
            torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
            length += k
    for got, want in zip(cache.keys + cache.values, expected_cache.keys + expected_cache.values):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.7, repetition_penalty=1.2),
                                      Sampling(temperature=1.1, top_k=4), Sampling(temperature=0.9, top_p=0.6),
                                      Sampling(temperature=1.0, top_k=20, top_p=0.9)])
@pytest.mark.parametrize("start,stop,extra", [(0, 300, ()), (100, 300, (7, 299, 11)), (0, 0, (5, 9, 250, 3))])
def test_device_head_choice_matches_the_reference(sampling: Sampling, start: int, stop: int, extra: tuple) -> None:
    g = torch.Generator().manual_seed(start + stop + len(extra) + int(sampling.temperature * 10))
    vocab, hidden_size = 300, 48
    table = torch.randn(vocab, hidden_size, generator=g) * 0.3
    hidden = torch.randn(1, hidden_size, generator=g)
    seen = (torch.rand(1, vocab, generator=g) < 0.2).to(torch.uint8)
    ids = torch.tensor(extra, dtype=torch.int64) if extra else None
    n = stop - start + len(extra)
    noise = torch.rand(1, n, generator=g)
    logits = torch.full((1, n), float("nan"))
    token, prob = torch.full((1,), -1, dtype=torch.int64), torch.full((1,), float("nan"))
    choose_on_device(table, hidden, seen, start, stop, ids, sampling, noise, logits, token, prob)
    want_token, want_prob, _ = restricted_head_reference(hidden, table, seen, start, stop, ids,
                                                         sampling.repetition_penalty, sampling.temperature, noise,
                                                         sampling.top_k, sampling.top_p)
    assert token.tolist() == want_token.tolist()
    torch.testing.assert_close(prob, want_prob, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("decoding", ["exact", "structured"])
def test_cuda_backend_gives_the_cpu_backends_tokens(tiny_checkpoint: Path, decoding: str) -> None:
    from rexedge.runtime.api import RexOmni

    image = (np.random.default_rng(4).random((90, 150, 3)) * 255).astype(np.uint8)
    results = []
    for device in ("cpu", "cuda"):
        model = RexOmni(tiny_checkpoint, backend="torch", device=device, decoding=decoding, max_tokens=60,
                        dtype="float32", max_context=1024)
        results.append(model.inference(image, "detection", ["cup", "door handle"])[0])
    cpu, cuda = results
    assert cuda["output_token_ids"] == cpu["output_token_ids"]
    assert cuda["stop_reason"] == cpu["stop_reason"]
