"""Index arrays the vision encoder needs for one image, computed from its patch grid alone.

The encoder sees the patch rows in the processor's order: 2x2 merge blocks in raster
order, and inside a block top-left, top-right, bottom-left, bottom-right. Before block 0
the rows are permuted, four at a time (one merge block = one merged token), into window
order: windows of ``window_merged x window_merged`` merged tokens, windows row-major over
the merged grid, tokens row-major inside a window. Windows on the right and bottom edges
may be partial. After the merger the inverse permutation restores raster order.

Windowed blocks attend inside each window only. To make that cost O(patches x window)
with one batched attention, the window-ordered patch rows are gathered into a padded
``[num_windows, window_patches]`` batch (``window_gather``, with ``window_valid`` as the
key mask) and the results are gathered back (``window_unpad``).

numpy only: the ONNX and TensorRT backends use these arrays without torch. Arrays are
read-only, so one layout can be cached and shared between frames of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from rexedge.runtime.errors import RexEdgeError


class VisionLayoutError(RexEdgeError, ValueError):
    """A patch grid the vision encoder cannot take."""


@dataclass(frozen=True, eq=False)
class VisionLayout:
    grid_h: int
    grid_w: int
    spatial_merge_size: int
    window_merged: int
    # [N/4] int64: for each merged token in window order, its raster index on the merged grid
    window_index: np.ndarray
    # [N/4] int64: argsort(window_index); takes merger outputs from window order back to raster order
    reverse_index: np.ndarray
    # [N, 2] int64: (row, col) in the patch grid of each patch row, in the processor's row order
    rotary_pos: np.ndarray
    # [N] int64: window_index expanded to patch rows (each merged token owns merge_unit consecutive rows)
    patch_order: np.ndarray
    # [W, P] int64: for window w and slot p, the window-ordered patch row there (the window's
    # first row in padding slots, so every gathered index is valid)
    window_gather: np.ndarray
    # [W, P] bool: which slots hold a real patch (the key mask of windowed attention)
    window_valid: np.ndarray
    # [N] int64: for each window-ordered patch row, its slot w * P + p in the flattened batch
    window_unpad: np.ndarray

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def num_tokens(self) -> int:
        """Image tokens (merged tokens) this image becomes in the prompt."""
        return self.num_patches // self.spatial_merge_size ** 2

    @property
    def merged_grid(self) -> tuple[int, int]:
        return self.grid_h // self.spatial_merge_size, self.grid_w // self.spatial_merge_size

    @property
    def num_windows(self) -> int:
        return int(self.window_gather.shape[0])

    @property
    def window_patches(self) -> int:
        """Slots per window in the padded batch: window_merged^2 merged tokens of merge_unit patches."""
        return int(self.window_gather.shape[1])


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise VisionLayoutError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def vision_layout(grid_h: int, grid_w: int, spatial_merge_size: int = 2, window_merged: int = 4) -> VisionLayout:
    """The layout of a ``grid_h x grid_w`` patch grid (14-px patches; both sides multiples of the merge size)."""
    grid_h = _positive_int(grid_h, "grid_h")
    grid_w = _positive_int(grid_w, "grid_w")
    merge = _positive_int(spatial_merge_size, "spatial_merge_size")
    window = _positive_int(window_merged, "window_merged")
    if grid_h % merge or grid_w % merge:
        raise VisionLayoutError(
            f"patch grid {grid_h}x{grid_w} must have both sides divisible by spatial_merge_size {merge} "
            f"(image sides must be multiples of {14 * merge} px after resizing)"
        )
    return _layout(grid_h, grid_w, merge, window)


# Frames of one video share a size; the arrays are read-only, so sharing them is safe.
@lru_cache(maxsize=64)
def _layout(grid_h: int, grid_w: int, merge: int, window: int) -> VisionLayout:
    merged_h, merged_w = grid_h // merge, grid_w // merge
    merge_unit = merge * merge

    # Pad the merged grid up to whole windows; unlike the reference (which pads by
    # window - n % window and so may add an all-padding window) no window here is empty.
    windows_h, windows_w = -(-merged_h // window), -(-merged_w // window)
    padded = np.full((windows_h * window, windows_w * window), -1, dtype=np.int64)
    padded[:merged_h, :merged_w] = np.arange(merged_h * merged_w, dtype=np.int64).reshape(merged_h, merged_w)
    windows = padded.reshape(windows_h, window, windows_w, window).transpose(0, 2, 1, 3)
    windows = windows.reshape(windows_h * windows_w, window * window)
    window_index = windows[windows >= 0]
    reverse_index = np.argsort(window_index, kind="stable")

    rows = np.broadcast_to(np.arange(grid_h, dtype=np.int64)[:, None], (grid_h, grid_w))
    cols = np.broadcast_to(np.arange(grid_w, dtype=np.int64)[None, :], (grid_h, grid_w))

    def block_order(values: np.ndarray) -> np.ndarray:
        return values.reshape(merged_h, merge, merged_w, merge).transpose(0, 2, 1, 3).reshape(-1)

    rotary_pos = np.stack([block_order(rows), block_order(cols)], axis=-1)
    patch_order = (window_index[:, None] * merge_unit + np.arange(merge_unit, dtype=np.int64)).reshape(-1)

    window_tokens = (windows >= 0).sum(axis=1)
    window_lengths = window_tokens * merge_unit
    window_starts = np.concatenate([[0], np.cumsum(window_lengths)[:-1]]).astype(np.int64)
    slots = window * window * merge_unit
    slot = np.arange(slots, dtype=np.int64)[None, :]
    window_valid = slot < window_lengths[:, None]
    window_gather = np.where(window_valid, window_starts[:, None] + slot, window_starts[:, None])
    window_unpad = np.flatnonzero(window_valid.reshape(-1)).astype(np.int64)

    return VisionLayout(
        grid_h=grid_h,
        grid_w=grid_w,
        spatial_merge_size=merge,
        window_merged=window,
        window_index=_frozen(window_index),
        reverse_index=_frozen(reverse_index.astype(np.int64)),
        rotary_pos=_frozen(rotary_pos),
        patch_order=_frozen(patch_order),
        window_gather=_frozen(window_gather.astype(np.int64)),
        window_valid=_frozen(window_valid),
        window_unpad=_frozen(window_unpad),
    )
