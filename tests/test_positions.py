"""Decoder M-RoPE positions against transformers' Qwen2_5_VLModel (get_rope_index and its decode path)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.positions import PositionError, decode_positions, rope_positions

CFG = RexOmniConfig.preset("tiny")
IMAGE, VISION_START, VISION_END = CFG.image_token_id, CFG.vision_start_token_id, CFG.vision_end_token_id
MERGE = CFG.spatial_merge_size


@pytest.fixture(scope="module")
def hf_model() -> Qwen2_5_VLModel:
    # get_rope_index reads only the config, so the weights can stay on the meta device
    with torch.device("meta"):
        model = Qwen2_5_VLModel(Qwen2_5_VLConfig(**CFG.to_hf_dict()))
    return model


def build_prompt(rng: np.random.Generator, grids: list[tuple[int, int]]) -> np.ndarray:
    """[text, vision_start, image_pad * rows*cols, vision_end] per image, then text; ordinary ids only in text."""
    parts = []
    for rows, cols in grids:
        parts += [rng.integers(0, 2000, rng.integers(0, 9)), [VISION_START], [IMAGE] * (rows * cols), [VISION_END]]
    parts.append(rng.integers(0, 2000, rng.integers(0, 9)))
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def reference(model: Qwen2_5_VLModel, ids: np.ndarray, grids: list[tuple[int, int]]) -> tuple[np.ndarray, int]:
    input_ids = torch.from_numpy(ids)[None]
    thw = torch.tensor([[1, r * MERGE, c * MERGE] for r, c in grids], dtype=torch.long) if grids else None
    positions, deltas = model.get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == IMAGE).int(), image_grid_thw=thw
    )
    return positions[:, 0].numpy(), int(deltas.item())


def reference_decode(model: Qwen2_5_VLModel, past_length: int, n: int) -> np.ndarray:
    """transformers' incremental path: positions from the cached rope_deltas and the cache length."""
    cache = SimpleNamespace(get_seq_length=lambda: past_length)
    positions = model.compute_3d_position_ids(
        input_ids=None,
        image_grid_thw=None,
        video_grid_thw=None,
        inputs_embeds=torch.zeros(1, n, CFG.hidden_size),
        attention_mask=None,
        past_key_values=cache,
    )
    return positions[:, 0].numpy()


@pytest.mark.parametrize("grid", [(1, 1), (1, 7), (6, 1), (3, 4), (5, 3), (29, 51)])
def test_one_image_matches_transformers(hf_model: Qwen2_5_VLModel, grid: tuple[int, int]) -> None:
    rng = np.random.default_rng(grid[0] * 100 + grid[1])
    for _ in range(3):
        ids = build_prompt(rng, [grid])
        positions, delta = rope_positions(ids, IMAGE, VISION_START, grid)
        expected, expected_delta = reference(hf_model, ids, [grid])
        assert positions.dtype == np.int64 and positions.shape == (3, ids.size)
        np.testing.assert_array_equal(positions, expected)
        assert delta == expected_delta


def test_random_grids_and_decode_match_transformers(hf_model: Qwen2_5_VLModel) -> None:
    rng = np.random.default_rng(7)
    for _ in range(8):
        grid = (int(rng.integers(1, 23)), int(rng.integers(1, 23)))
        ids = build_prompt(rng, [grid])
        _, delta = rope_positions(ids, IMAGE, VISION_START, grid)
        _, expected_delta = reference(hf_model, ids, [grid])
        hf_model.rope_deltas = torch.tensor([[expected_delta]])  # what its prefill would have cached
        assert delta == expected_delta
        for offset, n in [(0, 1), (int(rng.integers(1, 50)), 1), (int(rng.integers(0, 50)), int(rng.integers(2, 6)))]:
            cache_position = ids.size + offset
            got = decode_positions(cache_position, delta, n)
            assert got.dtype == np.int64 and got.shape == (3, n)
            np.testing.assert_array_equal(got, reference_decode(hf_model, cache_position, n))


def test_several_images_match_transformers(hf_model: Qwen2_5_VLModel) -> None:
    rng = np.random.default_rng(11)
    for grids in ([(2, 3), (4, 1)], [(1, 1), (5, 5), (3, 7)]):
        ids = build_prompt(rng, grids)
        positions, delta = rope_positions(ids, IMAGE, VISION_START, grids)
        expected, expected_delta = reference(hf_model, ids, grids)
        np.testing.assert_array_equal(positions, expected)
        assert delta == expected_delta


def test_text_only_prompt(hf_model: Qwen2_5_VLModel) -> None:
    ids = np.random.default_rng(3).integers(0, 2000, 13)
    positions, delta = rope_positions(ids, IMAGE, VISION_START, [])
    expected, expected_delta = reference(hf_model, ids, [])
    np.testing.assert_array_equal(positions, expected)
    assert delta == expected_delta == 0


def test_grid_as_numpy_pair_and_list_of_pairs_agree() -> None:
    ids = build_prompt(np.random.default_rng(5), [(3, 2)])
    a = rope_positions(ids, IMAGE, VISION_START, (3, 2))
    b = rope_positions(ids, IMAGE, VISION_START, [np.array([3, 2])])
    c = rope_positions(ids.astype(np.int32), IMAGE, VISION_START, [(3, 2)])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], c[0])
    assert a[1] == b[1] == c[1]


@pytest.mark.parametrize(
    "make_ids, grid, message",
    [
        (lambda: [1, VISION_START] + [IMAGE] * 6 + [VISION_END], (2, 2), "6 image tokens"),
        (lambda: [1, VISION_START] + [IMAGE] * 4 + [VISION_END], [(2, 2), (1, 1)], "2 image grid"),
        (lambda: [1, 2] + [IMAGE] * 4 + [VISION_END], (2, 2), "vision-start"),
        (lambda: [IMAGE] * 4 + [VISION_END], (2, 2), "vision-start"),
        (lambda: [1, VISION_START] + [IMAGE] * 4, (0, 4), "positive"),
        (lambda: [1, VISION_START] + [IMAGE] * 4, (2, True), "positive"),
        (lambda: [1, VISION_START] + [IMAGE] * 4, 4, "grid_hw_merged"),
        (lambda: [], (), "non-empty"),
        (lambda: [[1, 2], [3, 4]], (), "1-D"),
        (lambda: [1.0, 2.0], (), "integer"),
    ],
)
def test_bad_prompts_are_clear_errors(make_ids, grid, message: str) -> None:
    with pytest.raises(PositionError, match=message) as info:
        rope_positions(np.asarray(make_ids()), IMAGE, VISION_START, grid)
    assert isinstance(info.value, RexEdgeError)


@pytest.mark.parametrize("cache_position, n", [(-1, 1), (3, 0)])
def test_bad_decode_arguments(cache_position: int, n: int) -> None:
    with pytest.raises(PositionError):
        decode_positions(cache_position, -4, n)
