"""How closely an INT8 bundle follows its FP32 source: hidden states, coordinate logits, greedy tokens.

Both models get the same request (image, task prompt); each encodes the image with its
own vision graph, so the numbers cover the whole pipeline. Then, teacher-forced on the
reference's greedy tokens (argmax over the full vocabulary, no penalty), at the prefill
and after each of ``steps`` decode steps:

- cosine similarity of the final hidden states (after the last RMSNorm: what the head sees);
- cosine similarity of the coordinate logits (the 1,000 <0>..<999> rows, the rows that
  make a box), and whether their argmax (the bin a COORD step would pick) agrees, with
  the mean |bin difference|;
- whether the greedy token over the full vocabulary agrees.

Free-running, each model decodes greedily on its own, and the length of the common
prefix of the two token sequences is reported: one early disagreement changes every
later step, so this is the strictest number.

Works on any two backends (``ort`` for ort-flavour bundles, ``GraphBackend`` for any).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rexedge.calib.dataset import CalibrationSample, build_request
from rexedge.runtime.request.encode import embed_prompt
from rexedge.runtime.request.positions import decode_positions
from rexedge.runtime.request.preprocess import MAX_PIXELS, MIN_PIXELS, preprocess


@dataclass(frozen=True)
class Agreement:
    """One request's comparison (see the module docstring); cosines over prefill + ``steps`` positions."""

    steps: int
    image_embed_cosine: float          # mean over image tokens
    hidden_cosine_mean: float
    hidden_cosine_min: float
    coord_logit_cosine_mean: float
    coord_logit_cosine_min: float
    coord_argmax_agreement: float      # fraction of positions
    coord_bin_error_mean: float        # mean |bin difference| of the coordinate argmax
    token_agreement: float             # teacher-forced full-vocabulary greedy
    free_run_prefix: int               # common prefix of the free-running greedy sequences

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)


def _prefill(backend: Any, request: Any, image_embeds: np.ndarray) -> np.ndarray:
    embeds = embed_prompt(backend.embed_table, request.prompt_ids, image_embeds, backend.tokenizer.ids.image_pad)
    return np.array(backend.prefill(embeds, request.positions))


def _greedy(backend: Any, request: Any, image_embeds: np.ndarray, steps: int) -> list[int]:
    hidden = _prefill(backend, request, image_embeds)
    table, tokens = backend.embed_table, []
    for i in range(steps):
        tokens.append(int(np.argmax(table @ hidden)))
        if i + 1 < steps:
            position = decode_positions(backend.cache_length, request.rope_delta)
            hidden = np.array(backend.step(np.array(tokens[-1:], np.int64), position))
    return tokens


def compare(reference: Any, candidate: Any, sample: CalibrationSample, steps: int = 64,
            min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Agreement:
    """Compare ``candidate`` with ``reference`` (two backends of one model) on one request."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    image = preprocess(sample.image, min_pixels, max_pixels, cfg=reference.config)
    request = build_request(reference, sample, image)
    embeds_ref, embeds_cand = reference.encode_image(image), candidate.encode_image(image)
    ids = reference.tokenizer.ids
    coords = slice(ids.coord_start, ids.coord_start + ids.num_coords)
    table = reference.embed_table

    hidden_ref, hidden_cand = _prefill(reference, request, embeds_ref), _prefill(candidate, request, embeds_cand)
    rows_ref, rows_cand, forced = [], [], []
    for i in range(steps):
        rows_ref.append(hidden_ref)
        rows_cand.append(hidden_cand)
        forced.append(int(np.argmax(table @ hidden_ref)))
        if i + 1 < steps:
            token = np.array(forced[-1:], np.int64)
            position = decode_positions(reference.cache_length, request.rope_delta)
            hidden_ref = np.array(reference.step(token, position))
            hidden_cand = np.array(candidate.step(token, position))
    h_ref, h_cand = np.stack(rows_ref), np.stack(rows_cand)
    logits_ref, logits_cand = h_ref @ table.T, h_cand @ table.T
    coord_ref, coord_cand = logits_ref[:, coords], logits_cand[:, coords]
    hidden_cos, coord_cos = _cosine(h_ref, h_cand), _cosine(coord_ref, coord_cand)
    bins_ref, bins_cand = coord_ref.argmax(-1), coord_cand.argmax(-1)

    free_ref = forced  # the reference's teacher-forced run is its free run
    free_cand = _greedy(candidate, request, embeds_cand, steps)
    prefix = next((i for i, (a, b) in enumerate(zip(free_ref, free_cand)) if a != b), steps)
    return Agreement(
        steps=steps,
        image_embed_cosine=float(_cosine(embeds_ref, embeds_cand).mean()),
        hidden_cosine_mean=float(hidden_cos.mean()),
        hidden_cosine_min=float(hidden_cos.min()),
        coord_logit_cosine_mean=float(coord_cos.mean()),
        coord_logit_cosine_min=float(coord_cos.min()),
        coord_argmax_agreement=float((bins_ref == bins_cand).mean()),
        coord_bin_error_mean=float(np.abs(bins_ref - bins_cand).mean()),
        token_agreement=float((logits_ref.argmax(-1) == logits_cand.argmax(-1)).mean()),
        free_run_prefix=prefix,
    )


def summarize(results: Sequence[Agreement]) -> dict[str, float]:
    """Means over requests, and the worst request's value for the minima and the free-run prefix."""
    if not results:
        raise ValueError("no comparisons to summarize")
    table = {k: np.array([getattr(r, k) for r in results], np.float64) for k in asdict(results[0])}
    summary = {k: float(v.mean()) for k, v in table.items()}
    for key in ("hidden_cosine_min", "coord_logit_cosine_min", "free_run_prefix"):
        summary[key] = float(table[key].min())
    summary["free_run_prefix_mean"] = float(table["free_run_prefix"].mean())
    summary["requests"] = len(results)
    return summary
