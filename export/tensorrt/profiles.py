"""TensorRT optimization profiles for a bundle's graphs, written into the manifest at export.

A TensorRT engine with dynamic shapes is built for ranges of each input's dimensions
(min / opt / max per optimization profile); kernels are tuned for ``opt``. The ranges
come from the graphs' symbolic dimensions:

- vision, one profile: the patches of one image between the preprocessing's
  ``min_pixels`` and ``max_pixels`` (64 .. 10,240 patches), tuned for a 1440x810 image
  (58 x 102 patches, the example in docs/model.md); image tokens and windows follow.
- decoder, two profiles, because a prompt and a decode step want different kernels:
  ``prefill`` (an empty cache, 1 .. max_context new tokens, tuned for 1,536: about one
  image of 1,479 tokens plus the prompt) and ``decode`` (1 .. DECODE_TOKENS new tokens
  after 0 .. max_context - 1 cached, tuned for one token after 1,600).

Only the trt flavour's decoder is described here: the ort flavour never meets TensorRT.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from rexedge.export.onnx.decoder import BATCH, PAST, TOKENS
from rexedge.export.onnx.vision import MERGED, PATCHES, WINDOWS
from rexedge.runtime.config import RexOmniConfig

# the longest forced append (jump-forward) one decode-profile call takes; longer ones are split
DECODE_TOKENS = 16
PREFILL_OPT_TOKENS = 1536
DECODE_OPT_CONTEXT = 1600
# the 1440x810 example image: a 58 x 102 patch grid
OPT_PATCH_GRID = (58, 102)

Range = tuple[int, int, int]  # min, opt, max


def _shapes(inputs: Sequence[Mapping[str, Any]], dims: Mapping[str, Range]) -> dict[str, dict[str, list[int]]]:
    """Per input: min / opt / max full shapes, symbolic dimensions replaced from ``dims``."""
    shapes = {}
    for spec in inputs:
        picked = {key: [] for key in ("min", "opt", "max")}
        for dim in spec["shape"]:
            for index, key in enumerate(("min", "opt", "max")):
                picked[key].append(dims[dim][index] if isinstance(dim, str) else int(dim))
        shapes[spec["name"]] = picked
    return shapes


def vision_profiles(cfg: RexOmniConfig, inputs: Sequence[Mapping[str, Any]],
                    dims: Mapping[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """One profile over every image size the preprocessing produces."""
    rows, cols = OPT_PATCH_GRID
    merged_rows, merged_cols = rows // cfg.spatial_merge_size, cols // cfg.spatial_merge_size
    w = cfg.window_merged
    opt = {PATCHES: rows * cols, MERGED: merged_rows * merged_cols,
           WINDOWS: -(-merged_rows // w) * -(-merged_cols // w)}
    ranges = {name: (lo, min(max(opt[name], lo), hi), hi) for name, (lo, hi) in dims.items()}
    return [{"name": "image", "shapes": _shapes(inputs, ranges)}]


def decoder_profiles(inputs: Sequence[Mapping[str, Any]], max_context: int) -> list[dict[str, Any]]:
    """``prefill`` (empty cache) and ``decode`` (a few tokens after a cache) for the trt flavour."""
    prefill = {BATCH: (1, 1, 1), TOKENS: (1, min(PREFILL_OPT_TOKENS, max_context), max_context), PAST: (0, 0, 0)}
    decode = {BATCH: (1, 1, 1), TOKENS: (1, 1, DECODE_TOKENS),
              PAST: (0, min(DECODE_OPT_CONTEXT, max_context - 1), max_context - 1)}
    return [{"name": "prefill", "shapes": _shapes(inputs, prefill)},
            {"name": "decode", "shapes": _shapes(inputs, decode)}]
