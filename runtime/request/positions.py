"""Position ids of the text decoder's multimodal rotary embedding (M-RoPE).

Every token has three positions (t, h, w). Text tokens count up by one on all three
streams. The tokens of an image take (t, h, w) = (s, s + row, s + col) on the image's
merged-token grid, where s is the next text position; text after the image continues
from the largest position so far plus one. The sequence therefore ends at a smaller
position than its length, and ``rope_delta`` (negative once an image has more than one
row and more than one column of tokens) carries that offset into decoding: a token at cache position p gets p +
rope_delta on all three streams.

numpy only: the prompt's positions are computed once per request, outside any graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rexedge.runtime.errors import RexEdgeError


class PositionError(RexEdgeError, ValueError):
    """A prompt whose image tokens do not match the image grids given for it."""


GridHW = tuple[int, int]


def rope_positions(
    input_ids: np.ndarray,
    image_token_id: int,
    vision_start_id: int,
    grid_hw_merged: GridHW | Sequence[GridHW],
) -> tuple[np.ndarray, int]:
    """Positions [3, T] int64 of a prompt, and its rope_delta.

    input_ids: [T] token ids. Each image is one run of ``image_token_id`` right after a
        ``vision_start_id`` token.
    grid_hw_merged: (rows, cols) of merged image tokens for the prompt's one image, or a
        sequence of them, one per image in prompt order (empty for a text-only prompt).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        raise PositionError(f"input_ids must be a non-empty 1-D integer array, got shape {ids.shape} {ids.dtype}")
    grids = _grid_list(grid_hw_merged)

    is_image = np.concatenate([[0], (ids == image_token_id).astype(np.int8), [0]])
    run_edges = np.flatnonzero(np.diff(is_image))
    run_starts, run_ends = run_edges[0::2], run_edges[1::2]
    if len(run_starts) != len(grids):
        raise PositionError(
            f"input_ids hold {len(run_starts)} run(s) of image token {image_token_id} but {len(grids)} image grid(s) "
            f"were given"
        )

    positions = np.empty((3, ids.size), dtype=np.int64)
    next_position = 0
    text_start = 0
    for index, (start, end, (rows, cols)) in enumerate(zip(run_starts, run_ends, grids)):
        if start == 0 or ids[start - 1] != vision_start_id:
            raise PositionError(
                f"image {index}: its image tokens at index {start} do not follow a vision-start token {vision_start_id}"
            )
        if end - start != rows * cols:
            raise PositionError(
                f"image {index}: {end - start} image tokens in input_ids, "
                f"but its grid {rows}x{cols} needs {rows * cols}"
            )
        positions[:, text_start:start] = next_position + np.arange(start - text_start)
        next_position += start - text_start
        positions[0, start:end] = next_position
        positions[1, start:end] = next_position + np.repeat(np.arange(rows), cols)
        positions[2, start:end] = next_position + np.tile(np.arange(cols), rows)
        next_position += max(rows, cols)
        text_start = end
    positions[:, text_start:] = next_position + np.arange(ids.size - text_start)

    rope_delta = int(positions.max()) + 1 - ids.size
    return positions, rope_delta


def decode_positions(cache_position: int, rope_delta: int, n: int = 1) -> np.ndarray:
    """Positions [3, n] int64 of n new tokens whose first sits at ``cache_position`` in the KV cache."""
    if cache_position < 0 or n < 1:
        raise PositionError(f"need cache_position >= 0 and n >= 1, got cache_position={cache_position}, n={n}")
    stream = np.arange(cache_position, cache_position + n, dtype=np.int64) + rope_delta
    return np.repeat(stream[None, :], 3, axis=0)


def _grid_list(grid_hw_merged: GridHW | Sequence[GridHW]) -> list[GridHW]:
    """One (rows, cols) pair, or a sequence of them, as a list of validated pairs."""
    if not isinstance(grid_hw_merged, (Sequence, np.ndarray)):
        raise PositionError(f"grid_hw_merged must be (rows, cols) or a sequence of them, got {grid_hw_merged!r}")
    items = list(grid_hw_merged)
    if len(items) == 2 and all(_is_count(v) for v in items):
        items = [tuple(items)]
    grids = []
    for grid in items:
        pair = tuple(grid) if isinstance(grid, (Sequence, np.ndarray)) else ()
        if len(pair) != 2 or not all(_is_count(v) and v > 0 for v in pair):
            raise PositionError(f"an image grid must be (rows, cols) of positive merged-token counts, got {grid!r}")
        grids.append((int(pair[0]), int(pair[1])))
    return grids


def _is_count(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
