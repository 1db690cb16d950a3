"""The vision graph's inputs for one image, as every runner of a bundle's vision graph feeds them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np

from rexedge.runtime import manifest as schema

if TYPE_CHECKING:
    from rexedge.runtime.request.preprocess import PreprocessedImage


def vision_feeds(input_names: Iterable[str], image: PreprocessedImage) -> dict[str, np.ndarray]:
    """``pixel_patches`` (float32) and, for every other name, the image's layout array of that name
    (the vision graph's inputs are named after :class:`VisionLayout`'s fields), all C-contiguous."""
    feeds = {schema.PIXEL_PATCHES: np.ascontiguousarray(image.pixel_patches, dtype=np.float32)}
    feeds.update({name: np.ascontiguousarray(getattr(image.layout, name))
                  for name in input_names if name != schema.PIXEL_PATCHES})
    return feeds
