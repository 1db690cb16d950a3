"""TensorRT optimization profiles for a bundle's graphs, written into the manifest at export.

A TensorRT engine with dynamic shapes is built for ranges of each input's dimensions
(min / opt / max per optimization profile); kernels are tuned for ``opt``. The ranges
come from the graphs' symbolic dimensions:

- vision, one profile: the patches of one image between the preprocessing's
  ``min_pixels`` and ``max_pixels`` (64 .. 10,240 patches), tuned for a 1440x810 image
  (58 x 102 patches, the example in docs/model.md); image tokens and windows follow.
- decoder, two profiles, because a prompt and a decode step want different kernels:
  ``prefill`` (one sequence, an empty cache, 1 .. max_context new tokens, tuned for 1,536:
  about one image of 1,479 tokens plus the prompt) and ``decode`` (1 .. DECODE_BATCH rows of
  1 .. DECODE_TOKENS new tokens after 0 .. max_context - 1 + HOLE_ROOM cached, tuned for one
  row of one token after 1,600). Rows of a batched step share one cache length P and keep
  holes (see ``key_valid`` in :mod:`rexedge.export.onnx.decoder`), so P runs ahead of the
  longest row: HOLE_ROOM cache slots beyond max_context leave the runtime room for one more
  step before it has to compact the rows. The engine record keeps the decode profile's
  batch range (:func:`decode_batch`), so a backend asked for more rows says so at load.

Only the trt flavour's decoder is described here: the ort flavour never meets TensorRT.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from rexedge.export.onnx.decoder import BATCH, PAST, PRESENT, TOKENS
from rexedge.export.onnx.vision import MERGED, PATCHES, WINDOWS
from rexedge.runtime.config import RexOmniConfig

# the longest forced append (jump-forward) one decode-profile call takes; longer ones are split
DECODE_TOKENS = 16
# the most rows one decode call of the engines takes (RexOmni(..., max_batch=N) on trt needs N <= this)
DECODE_BATCH = 16
# cache slots past max_context in the decode profile: room for the holes of a batched step (module docstring)
HOLE_ROOM = DECODE_TOKENS
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
    """``prefill`` (one sequence, empty cache) and ``decode`` (rows of a few tokens after a cache) for the trt
    flavour."""
    prefill_tokens = (1, min(PREFILL_OPT_TOKENS, max_context), max_context)
    prefill = {BATCH: (1, 1, 1), TOKENS: prefill_tokens, PAST: (0, 0, 0), PRESENT: prefill_tokens}
    past = (0, min(DECODE_OPT_CONTEXT, max_context - 1), max_context - 1 + HOLE_ROOM)
    decode = {BATCH: (1, 1, DECODE_BATCH), TOKENS: (1, 1, DECODE_TOKENS), PAST: past,
              PRESENT: (1, past[1] + 1, past[2] + DECODE_TOKENS)}
    return [{"name": "prefill", "shapes": _shapes(inputs, prefill)},
            {"name": "decode", "shapes": _shapes(inputs, decode)}]


def decode_batch(profiles: Sequence[Mapping[str, Any]], inputs_embeds: str) -> int:
    """The most rows the ``decode`` profile of a decoder's ``profiles`` takes (its ``inputs_embeds`` batch)."""
    for profile in profiles:
        if profile["name"] == "decode":
            return int(profile["shapes"][inputs_embeds]["max"][0])
    raise ValueError("no 'decode' optimization profile")
