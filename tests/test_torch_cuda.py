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

from rexedge.runtime.model.checkpoint import load_model  # noqa: E402
from rexedge.runtime.model.compact import KVCache  # noqa: E402
from rexedge.kernels.restricted_head import restricted_head_reference  # noqa: E402
from rexedge.runtime.backends import BackendError, load_backend  # noqa: E402
from rexedge.runtime.backends.device_head import choose_on_device  # noqa: E402
from rexedge.runtime.backends.torch_cuda import MAX_APPEND, decode_step  # noqa: E402
from rexedge.runtime.decode.head import Sampling  # noqa: E402

CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if CUDA else "cpu"   # compiled on a GPU, under the interpreter on a CPU (conftest)


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
    device = torch.device(KERNEL_DEVICE)
    model = load_model(tiny_checkpoint, dtype=torch.float32, device=device)
    cfg = model.config
    rng = np.random.default_rng(21)
    cache, expected_cache = (KVCache.allocate(cfg, 1, 70, device=device) for _ in range(2))
    prompt = torch.from_numpy(rng.integers(0, cfg.vocab_size, 13)).to(device)
    positions = torch.from_numpy(np.stack([np.arange(13), np.arange(13) // 2, np.arange(13) % 5]))[:, None].to(device)
    with torch.inference_mode():
        for c in (cache, expected_cache):
            model.decode(model.embed(prompt)[None], positions, c, torch.arange(13, device=device), kv_length=13)
        length = 13
        for k in (1, 3, 1, 2):
            tokens = rng.integers(0, cfg.vocab_size, k)
            pos = np.repeat((np.arange(k) + length + 4)[None], 3, axis=0)
            hidden = decode_step(model, cache, _inputs(length, tokens, pos).to(device), k, context_bound=70)
            expected = model.decode(model.embed(torch.from_numpy(tokens).to(device))[None],
                                    torch.from_numpy(pos)[:, None].to(device), expected_cache,
                                    torch.arange(length, length + k, device=device), kv_length=length + k)[0, -1]
            torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
            length += k
    for got, want in zip(cache.keys + cache.values, expected_cache.keys + expected_cache.values):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.7, repetition_penalty=1.2),
                                      Sampling(temperature=1.1, top_k=4), Sampling(temperature=0.9, top_p=0.6),
                                      Sampling(temperature=1.0, top_k=20, top_p=0.9)])
@pytest.mark.parametrize("start,stop,extra,block", [(0, 300, (), False), (0, 300, (), True),
                                                    (100, 300, (7, 299, 11), False), (0, 0, (5, 9, 250, 3), False)])
def test_device_head_choice_matches_the_reference(sampling: Sampling, start: int, stop: int, extra: tuple,
                                                  block: bool) -> None:
    g = torch.Generator().manual_seed(start + stop + len(extra) + int(sampling.temperature * 10) + block)
    vocab, hidden_size = 300, 48
    table = torch.randn(vocab, hidden_size, generator=g) * 0.3
    hidden = torch.randn(1, hidden_size, generator=g)
    seen = (torch.rand(1, vocab, generator=g) < 0.2).to(torch.uint8)
    blocked = (torch.rand(1, vocab, generator=g) < 0.6).to(torch.uint8) if block else None
    ids = torch.tensor(extra, dtype=torch.int64) if extra else None
    n = stop - start + len(extra)
    noise = torch.rand(1, n, generator=g)
    logits = torch.full((1, n), float("nan"))
    token, prob = torch.full((1,), -1, dtype=torch.int64), torch.full((1,), float("nan"))
    on = [None if t is None else t.to(KERNEL_DEVICE) for t in (table, hidden, seen, ids, noise, logits, token, prob,
                                                                blocked)]
    choose_on_device(on[0], on[1], on[2], start, stop, on[3], sampling, on[4], on[5], on[6], on[7], on[8])
    token, prob = on[6].cpu(), on[7].cpu()
    want_token, want_prob, _ = restricted_head_reference(hidden, table, seen, start, stop, ids,
                                                         sampling.repetition_penalty, sampling.temperature, noise,
                                                         sampling.top_k, sampling.top_p, blocked)
    assert token.tolist() == want_token.tolist()
    torch.testing.assert_close(prob, want_prob, rtol=1e-5, atol=1e-6)


def talkative_image(on_cpu, size: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """A random image the tiny model answers with more than 10 tokens, and that answer on the CPU: a random
    model mostly answers <|im_end|> at once, which would compare a single full-vocabulary step."""
    for seed in range(60):
        image = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
        answer = on_cpu.inference(image, "detection", ["cup", "door handle"])[0]
        if len(answer["output_token_ids"]) > 10:
            return image, answer
    pytest.fail("no image made the tiny model answer with more than 10 tokens")


class StandInGraph:
    """A 'captured' step that re-runs its Python body on replay."""

    def __init__(self, fn) -> None:
        self.replay = fn


class StandInEvent:
    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.mark.skipif(CUDA, reason="the real thing runs below where CUDA is present")
@pytest.mark.parametrize("decoding, head_graphs", [("exact", 64), ("structured", 64), ("structured", 2)])
def test_cuda_backend_bookkeeping_on_cpu_stand_ins(tiny_checkpoint: Path, decoding: str, head_graphs: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """TorchCudaBackend and DeviceHead with CUDA's pieces replaced by CPU stand-ins (a graph that re-runs its
    body, events that do nothing, pinned memory that is plain memory; kernels under the interpreter): the
    packed inputs, cache length, one capture per step shape and the device head give the CPU backend's tokens.
    With the head's graphs capped (``head_graphs``) the steps past the cap run uncaptured, to the same tokens.
    What a real capture bakes in (a Python value read at capture time) shows only on a GPU, in the test below."""
    from rexedge.runtime.model import checkpoint
    from rexedge.runtime.api import RexOmni
    from rexedge.runtime.backends import device_head, torch_cuda

    monkeypatch.setattr(device_head, "MAX_HEAD_GRAPHS", head_graphs)

    captured, heads = [], []

    class RecordedHead(torch_cuda.DeviceHead):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            heads.append(self)

    def capture(fn):
        captured.append(fn)
        fn()   # the warm-up run happens for real in capture()
        return StandInGraph(fn)

    load_on_cpu = checkpoint.load_model
    monkeypatch.setattr(torch_cuda, "require_cuda", lambda device: None)
    monkeypatch.setattr(torch_cuda, "capture", capture)
    monkeypatch.setattr(torch_cuda, "DeviceHead", RecordedHead)
    monkeypatch.setattr(torch.cuda, "Event", StandInEvent)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(checkpoint, "load_model", lambda path, dtype, device=None: load_on_cpu(path, dtype=dtype))

    options = dict(backend="torch", decoding=decoding, max_tokens=40, dtype="float32", max_context=256)
    image, cpu = talkative_image(RexOmni(tiny_checkpoint, device="cpu", **options), (70, 110))
    model = RexOmni(tiny_checkpoint, device="cuda", **options)
    assert type(model.backend).__name__ == "TorchCudaBackend"
    stand_in = model.inference(image, "detection", ["cup", "door handle"])[0]
    assert stand_in["output_token_ids"] == cpu["output_token_ids"]
    assert stand_in["stop_reason"] == cpu["stop_reason"]
    # one capture per step shape (append length; allowed-set shape), replayed for every later step of that shape
    assert len(heads) == 1 and 1 in model.backend._graphs
    # structured phrase steps block coordinate / special rows through the device mask; exact mode never does
    assert bool(heads[0]._blocked_masks) == (decoding == "structured")
    assert len(captured) == len(model.backend._graphs) + len(heads[0]._graphs) < len(cpu["output_token_ids"])
    assert len(heads[0]._graphs) <= head_graphs


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("decoding", ["exact", "structured"])
def test_cuda_backend_gives_the_cpu_backends_tokens(tiny_checkpoint: Path, decoding: str) -> None:
    from rexedge.runtime.api import RexOmni

    options = dict(backend="torch", decoding=decoding, max_tokens=60, dtype="float32", max_context=1024)
    image, cpu = talkative_image(RexOmni(tiny_checkpoint, device="cpu", **options), (90, 150))
    model = RexOmni(tiny_checkpoint, device="cuda", **options)
    cuda = model.inference(image, "detection", ["cup", "door handle"])[0]
    # and again: the second run replays the graphs captured in the first
    again = model.inference(image, "detection", ["cup", "door handle"])[0]
    assert again["output_token_ids"] == cuda["output_token_ids"]
    assert cuda["output_token_ids"] == cpu["output_token_ids"]
    assert cuda["stop_reason"] == cpu["stop_reason"]
