"""The ort backend (exported bundle) against the torch backend (compact model), and backend errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from rexedge.runtime.backends import Backend, BackendError, load_backend
from rexedge.runtime.request.positions import decode_positions, rope_positions
from rexedge.runtime.request.preprocess import preprocess
from rexedge.runtime.request.prompts import build_prompt, encode_prompt
from rexedge.export.bundle import export_bundle

RTOL = 1e-4


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def bundle_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("backends") / "bundle", progress=False)


@pytest.fixture(scope="module")
def backends(tiny_checkpoint: Path, bundle_dir: Path) -> tuple[Backend, Backend]:
    return load_backend("ort", bundle_dir, max_context=96), load_backend("torch", tiny_checkpoint, max_context=96)


def test_both_backends_follow_the_interface(backends: tuple[Backend, Backend]) -> None:
    ort_backend, torch_backend = backends
    for backend, name in ((ort_backend, "ort"), (torch_backend, "torch")):
        assert isinstance(backend, Backend) and backend.name == name
        assert backend.embed_table.dtype == np.float32
        assert backend.embed_table.shape == (backend.config.vocab_size, backend.config.hidden_size)
        assert backend.max_context == 96
    np.testing.assert_array_equal(ort_backend.embed_table, torch_backend.embed_table)
    assert ort_backend.tokenizer.ids == torch_backend.tokenizer.ids


def test_ort_decoding_matches_torch(backends: tuple[Backend, Backend]) -> None:
    ort_backend, torch_backend = backends
    cfg = ort_backend.config
    rng = np.random.default_rng(11)
    # 150 x 90 px -> resized to the 12,544-pixel minimum: a merged grid that is not whole windows
    image = preprocess((rng.random((90, 150, 3)) * 255).astype(np.uint8), cfg=cfg)
    image_embeds = ort_backend.encode_image(image)
    assert image_embeds.shape == (image.num_image_tokens, cfg.hidden_size)
    assert relative_error(image_embeds, torch_backend.encode_image(image)) < RTOL

    tokenizer = ort_backend.tokenizer
    prompt = build_prompt("detection", ["cup", "door handle"], image_size=image.image_size)
    ids = np.array(encode_prompt(tokenizer, tokenizer.ids, prompt, image.num_image_tokens), np.int64)
    positions, rope_delta = rope_positions(ids, cfg.image_token_id, cfg.vision_start_token_id, image.merged_grid_hw)
    embeds = ort_backend.embed_table[ids]
    embeds[ids == cfg.image_token_id] = image_embeds

    hidden = ort_backend.prefill(embeds, positions)
    expected = torch_backend.prefill(embeds, positions)
    assert hidden.shape == (cfg.hidden_size,) and relative_error(hidden, expected) < RTOL
    # greedy tokens from the reference, fed to both; a k=3 append in the middle (jump-forward)
    for k in (1, 1, 3, 1, 2, 1):
        greedy = int(np.argmax(torch_backend.embed_table @ expected))
        tokens = np.array([greedy] + list(rng.integers(0, 2000, k - 1)), np.int64)
        step_positions = decode_positions(torch_backend.cache_length, rope_delta, k)
        hidden = ort_backend.step(tokens, step_positions).copy()
        expected = torch_backend.step(tokens, step_positions)
        assert relative_error(hidden, expected) < RTOL
        assert ort_backend.cache_length == torch_backend.cache_length
    assert ort_backend.cache_length == ids.size + 9

    # a new prefill starts from an empty cache
    ort_backend.prefill(embeds[:5], positions[:, :5])
    assert ort_backend.cache_length == 5


def test_single_token_step_reuses_its_buffers(bundle_dir: Path) -> None:
    backend = load_backend("ort", bundle_dir, max_context=8)
    backend.prefill(backend.embed_table[[1, 2]], np.tile(np.arange(2), (3, 1)))
    first = backend.step(np.array([3]), np.full((3, 1), 2))
    kept = first.copy()
    second = backend.step(np.array([4]), np.full((3, 1), 3))
    assert second is not kept and np.shares_memory(first, second)
    assert not np.array_equal(second, kept)


def test_kv_capacity_is_enforced(bundle_dir: Path) -> None:
    backend = load_backend("ort", bundle_dir, max_context=4)
    hidden = backend.config.hidden_size
    with pytest.raises(BackendError, match="exceed the KV capacity max_context=4"):
        backend.prefill(np.zeros((5, hidden), np.float32), np.tile(np.arange(5), (3, 1)))
    backend.prefill(np.zeros((3, hidden), np.float32), np.tile(np.arange(3), (3, 1)))
    with pytest.raises(BackendError, match="2 new token"):
        backend.step(np.array([1, 2]), np.tile(np.arange(3, 5), (3, 1)))
    backend.step(np.array([1]), np.full((3, 1), 3))
    assert backend.cache_length == 4


def test_bad_inputs(backends: tuple[Backend, Backend]) -> None:
    for backend in backends:
        with pytest.raises(BackendError, match=r"position_ids must be .* shape \(3, 2\)"):
            backend.step(np.array([1, 2]), np.zeros((3, 1), np.int64))
        with pytest.raises(BackendError, match="token ids must be in 0..2047"):
            backend.step(np.array([2048]), np.zeros((3, 1), np.int64))
        with pytest.raises(BackendError, match=r"inputs_embeds must have shape \(T >= 1, 64\)"):
            backend.prefill(np.zeros((2, 63), np.float32), np.zeros((3, 2), np.int64))


def test_backend_choice_errors(bundle_dir: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(BackendError, match="unknown backend 'onnx'; known backends: ort, torch, trt"):
        load_backend("onnx", bundle_dir)
    with pytest.raises(BackendError, match="does not take option.*max_contex"):
        load_backend("ort", bundle_dir, max_contex=16)
    with pytest.raises(BackendError, match="unknown device 'tpu'"):
        load_backend("ort", bundle_dir, device="tpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime-gpu is installed")
def test_cuda_without_onnxruntime_gpu_is_an_error(bundle_dir: Path) -> None:
    with pytest.raises(BackendError, match="pip install onnxruntime-gpu"):
        load_backend("ort", bundle_dir, device="cuda")


def test_torch_backend_without_torch_says_what_to_install(tiny_checkpoint: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if torch were not installed\n"
        "from rexedge.runtime.backends import BackendError, load_backend\n"
        "try:\n"
        f"    load_backend('torch', {str(tiny_checkpoint)!r})\n"
        "except BackendError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install rexedge[export]" in result.stdout
