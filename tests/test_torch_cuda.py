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

from rexedge.kernels.restricted_head import restricted_head_reference  # noqa: E402
from rexedge.runtime.backends import BackendError, load_backend  # noqa: E402
from rexedge.runtime.backends.device_head import choose_on_device  # noqa: E402
from rexedge.runtime.backends.torch_cuda import MAX_APPEND, decode_step, step_inputs_size  # noqa: E402
from rexedge.runtime.decode.head import Sampling  # noqa: E402
from rexedge.runtime.model.checkpoint import load_model  # noqa: E402
from rexedge.runtime.model.compact import KVCache  # noqa: E402

CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if CUDA else "cpu"   # compiled on a GPU, under the interpreter on a CPU (conftest)


@pytest.mark.skipif(CUDA, reason="checks the error raised where CUDA is missing")
def test_cuda_request_without_cuda_is_a_backend_error(tiny_checkpoint: Path) -> None:
    with pytest.raises(BackendError, match="no CUDA device"):
        load_backend("torch", tiny_checkpoint, device="cuda")
    with pytest.raises(BackendError, match="no CUDA device"):
        load_backend("torch", tiny_checkpoint, device="cuda:1", dtype="float32")
    assert type(load_backend("torch", tiny_checkpoint, device="cpu", max_context=32)).__name__ == "TorchBackend"


def _inputs(lengths: list[int], counts: list[int], tokens: np.ndarray, positions: np.ndarray,
            slots: int = 1) -> torch.Tensor:
    """Packed step inputs of ``slots`` rows, written field by field (independently of the backend's staging):
    tokens [B, T], positions [3, B, T]."""
    rows, width = tokens.shape
    packed = torch.zeros(step_inputs_size(slots), dtype=torch.int64)
    packed[:rows] = torch.tensor(lengths)
    packed[slots:slots + rows] = torch.tensor([max(c, 1) - 1 for c in counts])
    packed[2 * slots:2 * slots + slots * MAX_APPEND].view(slots, MAX_APPEND)[:rows, :width] = torch.from_numpy(tokens)
    packed[2 * slots + slots * MAX_APPEND:].view(3, slots, MAX_APPEND)[:, :rows, :width] = torch.from_numpy(positions)
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
            hidden = decode_step(model, cache, _inputs([length], [k], tokens[None], pos[:, None]).to(device), 1, k,
                                 context_bound=70)[0]
            expected = model.decode(model.embed(torch.from_numpy(tokens).to(device))[None],
                                    torch.from_numpy(pos)[:, None].to(device), expected_cache,
                                    torch.arange(length, length + k, device=device), kv_length=length + k)[0, -1]
            torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
            length += k
    for got, want in zip(cache.keys + cache.values, expected_cache.keys + expected_cache.values):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batch_buckets_and_step_widths() -> None:
    """Every batch size 1..max_batch runs the smallest bucket holding it; buckets are powers of two and
    max_batch; widths are the powers of two up to MAX_APPEND, each the smallest holding the run."""
    from rexedge.runtime.backends.torch_cuda import batch_buckets, bucket_for, step_width

    assert batch_buckets(1) == [1] and batch_buckets(3) == [1, 2, 3] and batch_buckets(16) == [1, 2, 4, 8, 16]
    for max_batch in (1, 2, 5, 7, 8, 13, 16, 33):
        buckets = batch_buckets(max_batch)
        assert buckets[-1] == max_batch and all(b & (b - 1) == 0 for b in buckets[:-1])
        assert len(buckets) == max_batch.bit_length() + (max_batch & (max_batch - 1) != 0)
        for rows in range(1, max_batch + 1):
            bucket = bucket_for(rows, buckets)
            assert bucket >= rows and not any(rows <= b < bucket for b in buckets)
    for tokens in range(1, MAX_APPEND + 1):
        width = step_width(tokens)
        assert tokens <= width <= MAX_APPEND and width & (width - 1) == 0 and (width == 1 or width // 2 < tokens)


def test_batched_decode_step_gives_each_row_its_own_append(tiny_checkpoint: Path) -> None:
    """The captured batched step's body: B rows of one bucket (the last idle), each at its own cache length,
    runs of different lengths padded to the width (a row not stepping at all): each real row's hidden state
    and cache == model.decode of that row alone; idle and padding writes land past each row's cached tokens."""
    device = torch.device(KERNEL_DEVICE)
    model = load_model(tiny_checkpoint, dtype=torch.float32, device=device)
    cfg = model.config
    rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
    slots, capacity, width = 5, 96, 4
    cache = KVCache.allocate(cfg, slots, capacity, device=device)
    alone = [KVCache.allocate(cfg, 1, capacity, device=device) for _ in range(slots)]
    lengths = [int(n) for n in rng.integers(3, 30, slots)]
    with torch.inference_mode():
        for row, n in enumerate(lengths):   # prompts of different lengths, into the batched cache and alone
            prompt = model.embed(torch.from_numpy(rng.integers(0, cfg.vocab_size, n)).to(device))[None]
            positions = torch.from_numpy(np.stack([np.arange(n), np.arange(n) // 3, np.arange(n) % 4]))[:, None]
            for c in (cache.slots(row, 1), alone[row]):
                model.decode(prompt, positions.to(device), c, torch.arange(n, device=device), kv_length=n)
        for counts in ([3, 1, 0, 2], [1, 1, 1, 1], [0, 4, 2, 1]):   # 4 rows stepping, bucket 5 (the 5th idle)
            rows = len(counts)
            tokens = rng.integers(0, cfg.vocab_size, (slots, width))
            pos = np.stack([np.arange(width)[None] + np.array(lengths)[:, None] + 7] * 3)
            packed = _inputs(lengths, counts + [0], tokens, pos, slots).to(device)
            hidden = decode_step(model, cache, packed, slots, width, capacity, slots)
            for row, k in enumerate(counts):
                if k == 0:
                    continue
                expected = model.decode(model.embed(torch.from_numpy(tokens[row, :k]).to(device))[None],
                                        torch.from_numpy(pos[:, row, :k])[:, None].to(device), alone[row],
                                        torch.arange(lengths[row], lengths[row] + k, device=device),
                                        kv_length=lengths[row] + k)[0, -1]
                torch.testing.assert_close(hidden[row], expected, rtol=1e-5, atol=1e-5)
            lengths = [n + k for n, k in zip(lengths, counts + [0])]
            assert rows == slots - 1
    for row, n in enumerate(lengths):
        for got, want in zip(cache.slots(row, 1).keys + cache.slots(row, 1).values, alone[row].keys + alone[row].values):
            torch.testing.assert_close(got[:, :, :n], want[:, :, :n], rtol=1e-5, atol=1e-5)


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


def cuda_stand_ins(monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """TorchCudaBackend's CUDA pieces replaced by CPU stand-ins (a graph that re-runs its body, events that do
    nothing, pinned memory that is plain memory, the model loaded on the CPU); the captured step bodies and the
    device heads made are recorded in the two lists returned."""
    from rexedge.runtime.backends import torch_cuda
    from rexedge.runtime.model import checkpoint

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
    return captured, heads


@pytest.mark.skipif(CUDA, reason="the real thing runs below where CUDA is present")
@pytest.mark.parametrize("decoding, head_graphs", [("exact", 64), ("structured", 64), ("structured", 2)])
def test_cuda_backend_bookkeeping_on_cpu_stand_ins(tiny_checkpoint: Path, decoding: str, head_graphs: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """TorchCudaBackend and DeviceHead with CUDA's pieces replaced by CPU stand-ins (a graph that re-runs its
    body, events that do nothing, pinned memory that is plain memory; kernels under the interpreter): the
    packed inputs, cache length, one capture per step shape and the device head give the CPU backend's tokens.
    With the head's graphs capped (``head_graphs``) the steps past the cap run uncaptured, to the same tokens.
    What a real capture bakes in (a Python value read at capture time) shows only on a GPU, in the test below."""
    from rexedge.runtime.api import RexOmni
    from rexedge.runtime.backends import device_head

    monkeypatch.setattr(device_head, "MAX_HEAD_GRAPHS", head_graphs)
    captured, heads = cuda_stand_ins(monkeypatch)
    options = dict(backend="torch", decoding=decoding, max_tokens=40, dtype="float32", max_context=256)
    image, cpu = talkative_image(RexOmni(tiny_checkpoint, device="cpu", **options), (70, 110))
    model = RexOmni(tiny_checkpoint, device="cuda", **options)
    assert type(model.backend).__name__ == "TorchCudaBackend"
    stand_in = model.inference(image, "detection", ["cup", "door handle"])[0]
    assert stand_in["output_token_ids"] == cpu["output_token_ids"]
    assert stand_in["stop_reason"] == cpu["stop_reason"]
    # one capture per step shape (append length; allowed-set shape), replayed for every later step of that shape
    assert len(heads) == 1 and (1, 1) in model.backend._graphs
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


def batched_equals_alone(tiny_checkpoint: Path, device: str, mode: str, max_batch: int, count: int,
                         max_new_tokens: int) -> tuple[object, object]:
    """``count`` random requests (mixed image sizes, categories, answer lengths) decoded ``max_batch`` at a time
    by the torch backend on ``device`` == each decoded alone by the CPU torch backend (exact or structured mode,
    fp32): tokens and stop reasons. Returns the batched model and the counting backend its steps went through."""
    from dataclasses import replace

    from test_batched_decoding import CountingBackend, decode_all, fresh, requests

    from rexedge.runtime.api import RexOmni

    options = dict(backend="torch", dtype="float32", max_context=512, max_tokens=max_new_tokens)
    batched = RexOmni(tiny_checkpoint, device=device, max_batch=max_batch, **options)
    single = RexOmni(tiny_checkpoint, device="cpu", **options)
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)
    made = [(p, replace(limits, max_new_tokens=int(rng.integers(3, max_new_tokens))))
            for p, limits in requests(batched, mode, seed, count)]
    counting = CountingBackend(batched.backend)
    keep_going = mode == "structured"
    finished = decode_all(batched, counting, made, mode, max_batch, keep_going=keep_going)
    alone = dict(decode_all(single, single.backend, fresh(single, made), mode, 1, keep_going=keep_going))
    assert sorted(key for key, _ in finished) == list(range(count))
    for key, gen in finished:
        assert gen.token_ids == alone[key].token_ids, (seed, key)
        assert gen.stop_reason == alone[key].stop_reason, (seed, key)
    # slots were refilled while others decoded, and steps ran with every slot
    assert len(counting.prefills) == count and counting.prefills[max_batch:]
    assert any(rows == max_batch for rows, _, _ in counting.calls)
    return batched, counting


@pytest.mark.skipif(CUDA, reason="the real thing runs below where CUDA is present")
@pytest.mark.parametrize("mode", ["exact", "structured"])
def test_batched_cuda_backend_on_cpu_stand_ins(tiny_checkpoint: Path, mode: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched step's bookkeeping (packed rows, per-slot lengths, buckets and widths, slot buffers, heads
    copying their row) on the CPU stand-ins: the tokens of the CPU backend decoding each request alone; one
    capture per (bucket, width) shape, the buckets of max_batch=3 being 1, 2 and 3."""
    captured, heads = cuda_stand_ins(monkeypatch)
    batched, counting = batched_equals_alone(tiny_checkpoint, "cuda", mode, 3, 5, 40)
    backend = batched.backend
    assert type(backend).__name__ == "TorchCudaBackend"
    shapes = set(backend._graphs)
    assert {rows for rows, _ in shapes} <= {1, 2, 3} and {width for _, width in shapes} <= {1, 2, 4, 8, 16, 32, 64}
    assert {(rows, 1 << (width - 1).bit_length()) for rows, width, _ in counting.calls} == shapes
    assert len(captured) == len(shapes) + sum(len(head._graphs) for head in heads)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["exact", "structured"])
@pytest.mark.parametrize("max_batch", [3, 5])
def test_batched_cuda_backend_gives_each_request_the_tokens_it_gets_alone(tiny_checkpoint: Path, mode: str,
                                                                          max_batch: int) -> None:
    """On the GPU (captured graphs per bucket: 1, 2, 3 / 1, 2, 4, 5): twice max_batch + 1 requests, slots refilled,
    each request's tokens those of the CPU backend decoding it alone; the graphs replay in a second run."""
    batched, _ = batched_equals_alone(tiny_checkpoint, "cuda", mode, max_batch, 2 * max_batch + 1, 60)
    assert {rows for rows, _ in batched.backend._graphs} <= set(range(1, max_batch + 1))
    batched_equals_alone(tiny_checkpoint, "cuda", mode, max_batch, max_batch + 2, 60)


@pytest.mark.skipif(CUDA, reason="the GPU runs the slots in the batched test above")
def test_cuda_backend_slots_on_cpu_stand_ins(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill copied into another slot and continued there (parallel categories' branches), then a batched
    step in which only that slot steps: the hidden states of the CPU backend running the same tokens alone."""
    cuda_stand_ins(monkeypatch)
    backend = load_backend("torch", tiny_checkpoint, device="cuda", dtype="float32", max_context=128, max_batch=3)
    cpu = load_backend("torch", tiny_checkpoint, device="cpu", max_context=128)
    rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
    prefix = rng.standard_normal((int(rng.integers(10, 40)), backend.config.hidden_size)).astype(np.float32)
    rest = rng.integers(0, backend.config.vocab_size, int(rng.integers(2, 9)))
    n = len(prefix) + len(rest)
    positions = np.stack([np.arange(n), np.arange(n) // 2, np.arange(n) % 3])
    backend.prefill(prefix, positions[:, :len(prefix)], slot=0)
    backend.copy_slot(0, 2)
    got = backend.step(rest, positions[:, len(prefix):], slot=2)
    cpu.prefill(prefix, positions[:, :len(prefix)])
    want = cpu.step(rest, positions[:, len(prefix):])
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-5, atol=1e-5)
    assert [backend.slot_length(s) for s in range(3)] == [len(prefix), 0, n]
    token = rng.integers(0, backend.config.vocab_size, (3, 1))
    hidden = backend.step_batch(token, np.full((3, 3, 1), n + 4), np.array([0, 0, 1]))
    want = cpu.step(token[2], np.full((3, 1), n + 4))
    torch.testing.assert_close(hidden[2], torch.from_numpy(want), rtol=1e-5, atol=1e-5)
    assert [backend.slot_length(s) for s in range(3)] == [len(prefix), 0, n + 1]
    with pytest.raises(BackendError, match="slot 3"):
        backend.step(rest, positions[:, len(prefix):], slot=3)
