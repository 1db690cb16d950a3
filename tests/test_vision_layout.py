"""VisionLayout against transformers' Qwen2.5-VL window index and rotary positions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.vision_layout import VisionLayoutError, vision_layout

# Qwen2.5-VL: 14-px patches, 2x2 merge, 112-px windows (4x4 merged tokens).
PATCH, MERGE, WINDOW_PX = 14, 2, 112


def reference(grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grid_thw = torch.tensor([[1, grid_h, grid_w]])
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, spatial_merge_size=MERGE, window_size=WINDOW_PX, patch_size=PATCH
    )
    position_ids = get_vision_position_ids(grid_thw, MERGE)
    return window_index.numpy(), cu_window_seqlens.numpy(), position_ids.numpy()


# merged grids: 3x5 (neither side a multiple of 4), 4x8 (both), 4x5, 7x4, 1x1, 9x13, 8x8
GRIDS = [(6, 10), (8, 16), (8, 10), (14, 8), (2, 2), (18, 26), (16, 16)]


@pytest.mark.parametrize("grid_h,grid_w", GRIDS)
def test_layout_matches_transformers(grid_h: int, grid_w: int) -> None:
    layout = vision_layout(grid_h, grid_w)
    ref_window_index, ref_cu, ref_pos = reference(grid_h, grid_w)

    np.testing.assert_array_equal(layout.window_index, ref_window_index)
    np.testing.assert_array_equal(layout.reverse_index, np.argsort(ref_window_index))
    np.testing.assert_array_equal(layout.rotary_pos, ref_pos)
    assert layout.num_tokens == grid_h * grid_w // 4 == len(ref_window_index)

    # The padded batch holds exactly the reference's windows, in its order, minus empty ones.
    lengths = layout.window_valid.sum(axis=1)
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(lengths)]), ref_cu)
    assert (lengths > 0).all()
    for w, (start, stop) in enumerate(zip(ref_cu[:-1], ref_cu[1:])):
        np.testing.assert_array_equal(layout.window_gather[w][layout.window_valid[w]], np.arange(start, stop))

    # patch_order is the reference's grouped permutation written per patch row
    rows = np.arange(grid_h * grid_w).reshape(-1, 4)
    np.testing.assert_array_equal(layout.patch_order, rows[ref_window_index].reshape(-1))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 5))
def test_gather_and_unpad_round_trip(merged_h: int, merged_w: int, window: int) -> None:
    layout = vision_layout(2 * merged_h, 2 * merged_w, window_merged=window)
    n = layout.num_patches
    assert layout.window_gather.shape == layout.window_valid.shape == (layout.num_windows, window * window * 4)
    assert ((layout.window_gather >= 0) & (layout.window_gather < n)).all()
    values = np.random.default_rng(merged_h * 100 + merged_w).standard_normal(n)
    batched = values[layout.window_gather]
    np.testing.assert_array_equal(batched.reshape(-1)[layout.window_unpad], values)
    # every real patch sits in exactly one valid slot
    np.testing.assert_array_equal(np.sort(layout.window_gather[layout.window_valid]), np.arange(n))
    np.testing.assert_array_equal(layout.window_index[layout.reverse_index], np.arange(layout.num_tokens))


def test_arrays_are_read_only_and_cached() -> None:
    layout = vision_layout(10, 6)
    assert vision_layout(10, 6) is layout
    with pytest.raises(ValueError):
        layout.window_index[0] = 3


@pytest.mark.parametrize(
    "args,needle",
    [((7, 8), "divisible"), ((8, 0), "grid_w"), ((-2, 8), "grid_h"), ((8.0, 8), "grid_h"), ((8, 8, 2, 0), "window_merged")],
)
def test_bad_grid_is_a_clear_error(args: tuple, needle: str) -> None:
    with pytest.raises(VisionLayoutError, match=needle) as info:
        vision_layout(*args)
    assert isinstance(info.value, RexEdgeError)
