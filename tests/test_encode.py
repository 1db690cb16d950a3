"""embed_prompt: the prompt's embedding rows with the image's embeddings at its image tokens."""

from __future__ import annotations

import numpy as np
import pytest

from rexedge.runtime.request.encode import embed_prompt

IMAGE = 7


def test_image_rows_take_the_image_embeddings_in_order() -> None:
    rng = np.random.default_rng()   # fresh inputs every run
    table = rng.standard_normal((23, 5)).astype(np.float16)   # not float32: the result is
    ids = rng.integers(0, 23, 31)
    ids[ids == IMAGE] = 0
    image_at = np.sort(rng.choice(31, 9, replace=False))
    ids[image_at] = IMAGE
    image = rng.standard_normal((9, 5)).astype(np.float32)
    got = embed_prompt(table, ids, image, IMAGE)
    assert got.dtype == np.float32
    for row, token in enumerate(ids):
        want = image[list(image_at).index(row)] if token == IMAGE else table[token].astype(np.float32)
        assert np.array_equal(got[row], want)
    assert not np.shares_memory(got, table)


def test_a_count_mismatch_names_both_counts() -> None:
    ids = np.array([1, IMAGE, IMAGE, 2])
    with pytest.raises(ValueError, match="prompt has 2 image tokens but the image gave 3 embeddings"):
        embed_prompt(np.zeros((10, 4), np.float32), ids, np.zeros((3, 4), np.float32), IMAGE)
