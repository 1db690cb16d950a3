"""Train the embedded default model on generated shapes: ``python -m rexedge.export.shapes.train``.

A small model of Rex-Omni's architecture (config preset "shapes", see its comment in
``rexedge.runtime.config``) learns to answer detection prompts on the scenes of
:mod:`rexedge.export.shapes.scenes`. Everything runs through the project's own code: the runtime's
preprocessing, prompt, tokenizer and M-RoPE positions, the compact model of
:mod:`rexedge.runtime.model.compact`, and the published checkpoint layout (``rexedge export`` takes
``OUT/checkpoint``).

Resumable: ``OUT/state.pt`` holds the model, the optimizer, the step, the options and the
torch RNG state; scenes are a function of (data seed, step, index), so a resumed run
continues exactly where a continuous one would be. Run it again with a larger ``--steps`` to
continue.

The recipe (the issue's first try learned the format but not position):
- soft targets for coordinate tokens: a Gaussian over neighbouring bins (``coord_sigma``
  bins) instead of one-hot, since a bin off by a few is nearly as right as the true one;
- coordinate embeddings initialised from the bin value (sines and cosines of the bin at
  geometric frequencies), so the tied head scores neighbouring bins alike from the start;
- a curriculum: scenes with at most ``curriculum_shapes`` shapes for the first
  ``curriculum_steps`` steps, then the full 1-4.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rexedge.export.fixtures.tiny import write_checkpoint
from rexedge.export.shapes.scenes import CATEGORIES, MAX_PIXELS, MAX_SHAPES, MIN_PIXELS, Scene, make_scene
from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.model.checkpoint import expected_tensor_shapes
from rexedge.runtime.model.compact import DecoderOps, KVCache, RexOmniModel, VisionIndices, apply_rotary
from rexedge.runtime.request.positions import rope_positions
from rexedge.runtime.request.preprocess import preprocess
from rexedge.runtime.request.prompts import box_to_bins, build_task_prompt, encode_prompt
from rexedge.runtime.request.tokenizer import NUM_COORDS, TokenIds, Tokenizer

STATE_FILE = "state.pt"
CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "train.log"
INIT_STD = 0.02
BACKGROUND = len(CATEGORIES)  # the object loss's class of an image token outside every box
SLOTS = 4  # a box's coordinates x0, y0, x1, y1
READOUTS = ("aux", "dense", "value", "match")  # the trainer's training-only readouts, each with its own optimizer
TRAINABLE_PRESETS = ("shapes", "shapes2", "tiny")  # the presets of the synthetic ("tiny") vocabulary


@dataclass(frozen=True)
class TrainOptions:
    preset: str = "shapes"
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    decay_steps: int = 20000  # cosine from lr to min_lr over this many steps, then min_lr
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    coord_sigma: float = 3.0  # bins; 0 = one-hot targets
    # coarse to fine: sigma starts here and shrinks geometrically to coord_sigma over
    # coord_sigma_steps steps (0: constant coord_sigma). A wide Gaussian's target holds only
    # the low frequencies of the bin embeddings, so the model first learns coarse position.
    coord_sigma_start: float = 0.0
    coord_sigma_steps: int = 0
    coord_init: bool = True
    coord_embed_std: float = INIT_STD
    image_embed_std: float = 0.0  # > 0: the merger's output layer is initialised to this output std
    aux_weight: float = 0.0  # > 0: add the image tokens' position loss (see position_loss) with this weight
    box_weight: float = 0.0  # > 0: add the image tokens' object box loss (see object_loss) with this weight
    class_weight: float = 0.0  # > 0: add the image tokens' object category loss (see object_loss) with this weight
    lookup_weight: float = 0.0  # > 0: add the answer's look-up attention loss (see lookup_loss) with this weight
    lookup_layers: int = 2  # the look-up loss supervises head 0 of this many last decoder layers
    # True: query head s (0..3) of those layers looks up the box only where the answer writes slot s
    # (x0, y0, x1, y1) and rests on <|vision_start|> elsewhere, and every kv head's values name the box
    # (see lookup_loss): the slot is chosen by which head attends, not by a later layer
    lookup_slots: bool = False
    value_weight: float = 0.0  # > 0: add the look-up values' box loss (see value_loss) with this weight
    match_weight: float = 0.0  # > 0: add the look-up's category match loss (see match_loss) with this weight
    curriculum_steps: int = 1000
    curriculum_shapes: int = 2
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    seed: int = 0
    data_seed: int = 0


@dataclass
class Example:
    """One scene as model inputs: image patches, the prompt + answer ids, their positions."""

    pixel_patches: torch.Tensor
    indices: VisionIndices
    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [3, T]
    num_prompt: int
    objects: tuple[tuple[int, tuple[int, int, int, int]], ...]  # (category index, box in bins) per shape
    asked: tuple[int, ...]  # the prompt's category indices in order: the answer's groups


def make_example(scene: Scene, tokenizer: Tokenizer, cfg: RexOmniConfig, min_pixels: int, max_pixels: int) -> Example:
    image = preprocess(scene.image, min_pixels, max_pixels, cfg=cfg)
    prompt = encode_prompt(tokenizer, tokenizer.ids, build_task_prompt("detection", list(scene.categories)),
                           image.num_image_tokens)
    ids = np.array(prompt + scene.answer_ids(tokenizer), dtype=np.int64)
    positions, _ = rope_positions(ids, cfg.image_token_id, cfg.vision_start_token_id, image.merged_grid_hw)
    objects = tuple((CATEGORIES.index(s.category), box_to_bins(s.box, scene.size)) for s in scene.shapes)
    return Example(torch.from_numpy(image.pixel_patches.copy()), VisionIndices.from_layout(image.layout),
                   ids, positions, len(prompt), objects, tuple(CATEGORIES.index(c) for c in scene.categories))


def scene_seed(data_seed: int, step: int, index: int, batch_size: int) -> int:
    """Training scenes: a distinct seed per (step, index); evaluation uses seeds from 2**40 on."""
    return data_seed * 2**36 + step * batch_size + index


def init_model(cfg: RexOmniConfig, options: TrainOptions, coord_start: int, num_coords: int) -> RexOmniModel:
    """A freshly initialised model: small normal weights, residual outputs scaled by depth, unit norms."""
    torch.manual_seed(options.seed)
    model = RexOmniModel(cfg)
    residual_std = INIT_STD / math.sqrt(2 * cfg.num_hidden_layers)
    for name, param in model.named_parameters():
        if name.startswith("visual."):
            continue  # torch's default init (scaled to fan-in) suits the vision tower's unit-scale inputs
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            torch.nn.init.ones_(param)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(param)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(param, std=residual_std)
        else:
            torch.nn.init.normal_(param, std=INIT_STD)
    with torch.no_grad():
        if options.image_embed_std > 0:
            # the merger's output is the image tokens' residual stream: at torch's default init it
            # is ~25x the text embeddings, and what attention writes there is lost under it
            out = model.visual.merger.mlp[2]
            torch.nn.init.normal_(out.weight, std=options.image_embed_std / math.sqrt(out.in_features))
            torch.nn.init.zeros_(out.bias)
        if options.coord_init:
            model.model.embed_tokens.weight[coord_start:coord_start + num_coords] = coordinate_embeddings(
                num_coords, cfg.hidden_size, options.seed, options.coord_embed_std)
    return model


def coordinate_embeddings(num_coords: int, hidden: int, seed: int, std: float = INIT_STD) -> torch.Tensor:
    """[num_coords, hidden]: half the dims sin/cos of the bin at geometric frequencies (from one
    half-turn over all bins to a turn every ~8 bins), half small noise; each dim of std ``std``."""
    pairs = hidden // 4
    value = torch.arange(num_coords, dtype=torch.float32)[:, None] / (num_coords - 1)
    turns = torch.logspace(math.log10(0.5), math.log10(num_coords / 8), pairs)
    angles = 2 * math.pi * value * turns
    generator = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(num_coords, hidden - 2 * pairs, generator=generator) * std
    smooth = torch.cat([angles.sin(), angles.cos()], dim=1) * (std * math.sqrt(2))
    return torch.cat([smooth, noise], dim=1)


def probed_layers(cfg: RexOmniConfig, lookup_layers: int) -> range:
    """The decoder layers whose head 0 the look-up, value and match losses supervise: the last ``lookup_layers``."""
    return range(cfg.num_hidden_layers - lookup_layers, cfg.num_hidden_layers)


def readout_optimizer(readout: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """A training-only readout's own AdamW (no weight decay), so that a resumed run can take a readout up."""
    return torch.optim.AdamW(readout.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)


def forward_loss(model: RexOmniModel, examples: list[Example], token_ids: TokenIds,
                 coord_sigma: float, aux: torch.nn.Module | None = None, aux_weight: float = 0.0,
                 dense: torch.nn.ModuleDict | None = None, box_weight: float = 0.0, class_weight: float = 0.0,
                 lookup_weight: float = 0.0, lookup_layers: int = 2, value: torch.nn.ModuleDict | None = None,
                 value_weight: float = 0.0, lookup_slots: bool = False, match: torch.nn.ModuleDict | None = None,
                 match_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over the answer tokens of a batch (soft targets for coordinates) and metrics,
    plus ``aux_weight`` x the image-token position loss (see ``position_loss``) when ``aux`` is given,
    ``box_weight`` / ``class_weight`` x the image-token object losses (see ``object_loss``) when
    ``dense`` is given, and ``lookup_weight`` x the look-up loss (see ``lookup_loss``) of head 0 in
    the last ``lookup_layers`` layers (query heads 0..3, one per coordinate slot, with ``lookup_slots``),
    ``value_weight`` x the box loss of those heads' values (see ``value_loss``) when ``value`` is given, and
    ``match_weight`` x the category match of their queries and keys (see ``match_loss``) when ``match`` is given."""
    cfg = model.config
    coord_start, num_coords, pad_id = token_ids.coord_start, token_ids.num_coords, token_ids.endoftext
    image_embeds = torch.cat([model.encode_image(e.pixel_patches, e.indices) for e in examples])
    length = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    ids = torch.full((batch, length), pad_id, dtype=torch.int64)
    positions = torch.zeros((3, batch, length), dtype=torch.int64)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.from_numpy(e.input_ids)
        positions[:, row, :n] = torch.from_numpy(e.positions)
        # padding after the answer: positions keep counting (causal attention never lets the answer see it)
        positions[:, row, n:] = int(e.positions.max()) + 1 + torch.arange(length - n)
    embeds = model.embed(ids).masked_scatter((ids == cfg.image_token_id)[..., None], image_embeds)
    cache = KVCache.allocate(cfg, batch, length)
    lookup = lookup_weight > 0 or (value is not None and value_weight > 0) or (match is not None and match_weight > 0)
    probed = probed_layers(cfg, lookup_layers)
    ops = AttentionProbe(probed, heads=SLOTS if lookup_slots else 1) if lookup else DecoderOps()
    hidden = model.decode(embeds, positions, cache, torch.arange(length), kv_length=length, ops=ops)

    rows, cols = [], []
    for row, e in enumerate(examples):
        cols += range(e.num_prompt - 1, len(e.input_ids) - 1)
        rows += [row] * (len(e.input_ids) - e.num_prompt)
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    targets = ids[rows_t, cols_t + 1]
    logp = F.log_softmax(model.logits(hidden[rows_t, cols_t]).float(), dim=-1)

    is_coord = (targets >= coord_start) & (targets < coord_start + num_coords)
    coord_counts = torch.zeros(len(examples), dtype=torch.int64).index_add_(0, rows_t, is_coord.long())
    token_nll = -logp.gather(1, targets[:, None])[:, 0]
    coord_logp = logp[is_coord][:, coord_start:coord_start + num_coords]
    coord_bins = targets[is_coord] - coord_start
    if coord_sigma > 0:
        bins = torch.arange(num_coords, dtype=torch.float32)
        soft = torch.exp(-0.5 * ((bins[None, :] - coord_bins[:, None].float()) / coord_sigma) ** 2)
        soft = soft / soft.sum(dim=1, keepdim=True)
        coord_nll = -(soft * coord_logp).sum(dim=1)
    else:
        coord_nll = token_nll[is_coord]
    loss = (token_nll[~is_coord].sum() + coord_nll.sum()) / len(targets)
    aux_metrics: dict[str, float] = {}
    if aux is not None and aux_weight > 0:
        aux_loss, aux_metrics = position_loss(model, aux, hidden, ids, positions, coord_start, num_coords)
        loss = loss + aux_weight * aux_loss
    if dense is not None and (box_weight > 0 or class_weight > 0):
        box_loss, class_loss, object_metrics = object_loss(model, dense, hidden, ids, positions, examples,
                                                           coord_start, num_coords, max(coord_sigma, 1.0))
        loss = loss + box_weight * box_loss + class_weight * class_loss
        aux_metrics.update(object_metrics)
    if lookup_weight > 0:
        attention_loss, lookup_metrics = lookup_loss(ops.probs, ids, positions, examples, cfg, token_ids,
                                                     lookup_slots)
        loss = loss + lookup_weight * attention_loss
        aux_metrics.update(lookup_metrics)
    if value is not None and value_weight > 0:
        box_loss, value_metrics = value_loss(model, value, ops.values, ids, positions, examples, coord_start,
                                             num_coords, max(coord_sigma, 1.0))
        loss = loss + value_weight * box_loss
        aux_metrics.update(value_metrics)
    if match is not None and match_weight > 0:
        category_loss, match_metrics = match_loss(match, ops.queries, ops.keys, ids, positions, examples, cfg,
                                                  token_ids.box_start)
        loss = loss + match_weight * category_loss
        aux_metrics.update(match_metrics)
    with torch.no_grad():
        bin_error = (coord_logp.argmax(dim=1) - coord_bins).abs().float()
        # position learned at all? the correlation of the expected bin with the true one, each
        # centred on its slot's (x0, y0, x1, y1) mean so that a learned prior alone scores 0
        expected = (coord_logp.exp() * torch.arange(num_coords)).sum(dim=1) / coord_logp.exp().sum(dim=1)
        slots = torch.cat([torch.arange(int(n)) % 4 for n in coord_counts])
        pair = torch.stack([expected, coord_bins.float()])
        for slot in range(4):
            pair[:, slots == slot] -= pair[:, slots == slot].mean(dim=1, keepdim=True)
        metrics = {
            "coord_corr": float(torch.corrcoef(pair)[0, 1]) if len(coord_bins) > 4 else 0.0,
            "text_nll": float(token_nll[~is_coord].mean()),
            "coord_nll": float(token_nll[is_coord].mean()),
            "coord_mae": float(bin_error.mean()),
            "coord_within10": float((bin_error <= 10).float().mean()),
            **aux_metrics,
        }
    return loss, metrics


def coord_sigma(options: TrainOptions, step: int) -> float:
    if options.coord_sigma_start <= 0 or options.coord_sigma_steps <= 0 or options.coord_sigma <= 0:
        return options.coord_sigma
    remaining = max(0.0, 1.0 - step / options.coord_sigma_steps)
    return options.coord_sigma * (options.coord_sigma_start / options.coord_sigma) ** remaining


def image_grid(ids: torch.Tensor, positions: torch.Tensor, image_token_id: int) -> dict[str, torch.Tensor]:
    """Each image token of a padded batch: its sequence ("batch"), merged-grid "row" and "col" (float),
    its grid's "rows" and "cols", and the token's centre "x", "y" in coordinate bins; "mask" [B, T] marks them."""
    is_image = ids == image_token_id
    # an image token's (h, w) positions minus its t position are its (row, col) on the merged grid
    row = (positions[1] - positions[0])[is_image].float()
    col = (positions[2] - positions[0])[is_image].float()
    batch_index = torch.arange(ids.shape[0])[:, None].expand_as(ids)[is_image]
    grid = torch.tensor([[row[batch_index == b].max() + 1, col[batch_index == b].max() + 1] for b in range(ids.shape[0])])
    num_rows, num_cols = grid[batch_index, 0], grid[batch_index, 1]
    top = NUM_COORDS - 1
    return {"mask": is_image, "batch": batch_index, "row": row, "col": col, "rows": num_rows, "cols": num_cols,
            "x": (col + 0.5) / num_cols * top, "y": (row + 0.5) / num_rows * top}


def soft_bin_nll(readout: torch.Tensor, coord_rows: torch.Tensor, targets: torch.Tensor, sigma: torch.Tensor | float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``readout`` [N, K, hidden] scored against the coordinate rows [bins, hidden]
    with Gaussian soft targets around ``targets`` [N, K] (bins, width ``sigma``); also the expected bin [N, K]."""
    logp = F.log_softmax((readout @ coord_rows.T).float(), dim=-1)  # [N, K, bins]
    bins = torch.arange(coord_rows.shape[0], dtype=torch.float32)
    soft = torch.exp(-0.5 * ((bins - targets[..., None]) / sigma) ** 2)
    soft = soft / soft.sum(dim=-1, keepdim=True)
    return -(soft * logp).sum(dim=-1).mean(), (logp.exp() * bins).sum(dim=-1).detach()


def position_loss(model: RexOmniModel, aux: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
                  positions: torch.Tensor, coord_start: int, num_coords: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Training-only dense supervision of position: each image token's final hidden state, through
    ``aux`` (hidden -> 2 x hidden, dropped at export), names its own column and row as coordinate
    bins through the tied coordinate rows. Plain backgrounds give no absolute reference, so the
    decoder must derive (row, col) from its rotary offsets to <|vision_start|>; the answer's few
    coordinates are a sparse signal for that, ~100 image tokens per scene a dense one."""
    g = image_grid(ids, positions, model.config.image_token_id)
    targets = torch.stack([g["x"], g["y"]], dim=1)  # [N, 2] bins
    readout = aux(hidden[g["mask"]]).view(-1, 2, hidden.shape[-1])
    coord_rows = model.head_weight[coord_start:coord_start + num_coords]
    # a merged cell spans top / cells bins: spread the target over it
    sigma = ((num_coords - 1) / torch.stack([g["cols"], g["rows"]], dim=1) / 2)[..., None]
    loss, expected = soft_bin_nll(readout, coord_rows, targets, sigma)
    return loss, {"aux_nll": loss.item(), "aux_mae": float((expected - targets).abs().mean())}


def object_targets(g: dict[str, torch.Tensor], examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image token of ``image_grid`` ``g``: the category index of the shape whose box holds its
    centre (``BACKGROUND`` if none) and that box in bins [N, 4] (zeros on background)."""
    classes = torch.full_like(g["x"], BACKGROUND, dtype=torch.int64)
    boxes = torch.zeros((len(classes), 4))
    for b, example in enumerate(examples):
        # larger boxes first, so that where two overlap the smaller (drawn on top, mostly) wins
        for category, box in sorted(example.objects, key=lambda o: -(o[1][2] - o[1][0]) * (o[1][3] - o[1][1])):
            inside = ((g["batch"] == b) & (g["x"] >= box[0]) & (g["x"] <= box[2])
                      & (g["y"] >= box[1]) & (g["y"] <= box[3]))
            classes[inside] = category
            boxes[inside] = torch.tensor(box, dtype=torch.float32)
    return classes, boxes


def object_loss(model: RexOmniModel, dense: torch.nn.ModuleDict, hidden: torch.Tensor, ids: torch.Tensor,
                positions: torch.Tensor, examples: list[Example], coord_start: int, num_coords: int, sigma: float,
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Training-only dense supervision of objects (the detector-style target, one per image token):
    a token whose centre lies in a shape's box names that shape's box (x0, y0, x1, y1 as coordinate
    bins through ``dense["box"]``, hidden -> 4 x hidden, and the tied coordinate rows) and every token
    names its shape's category or background (``dense["category"]``). The answer then only has to
    find the tokens of a category by content and copy the box they all carry: the few answer
    coordinates per scene are a sparse signal, the ~100 image tokens a dense one.
    Returns (box loss, category loss, metrics)."""
    g = image_grid(ids, positions, model.config.image_token_id)
    classes, boxes = object_targets(g, examples)
    image_hidden = hidden[g["mask"]]
    class_logits = dense["category"](image_hidden)
    class_loss = F.cross_entropy(class_logits.float(), classes)
    metrics = {"class_acc": float((class_logits.argmax(dim=-1) == classes).float().mean())}
    on_object = classes != BACKGROUND
    if not bool(on_object.any()):
        return hidden.new_zeros(()), class_loss, metrics
    readout = dense["box"](image_hidden[on_object]).view(-1, 4, hidden.shape[-1])
    coord_rows = model.head_weight[coord_start:coord_start + num_coords]
    box_loss, expected = soft_bin_nll(readout, coord_rows, boxes[on_object], sigma)
    metrics.update(box_nll=box_loss.item(), box_mae=float((expected - boxes[on_object]).abs().mean()))
    return box_loss, class_loss, metrics


class AttentionProbe(DecoderOps):
    """Training only: the plain-torch ops that also keep the attention probabilities [B, heads, T, S]
    of query heads 0..heads-1 in each layer of ``layers`` (indices), for ``lookup_loss``, and the
    values [B, G, S, D] of the G kv heads they read (grouped-query attention: head h reads kv head
    h // (query heads / kv heads)), and the rotated queries [B, heads, T, D] and keys [B, heads, S, D]
    that made them (for ``match_loss``). SDPA does not return its probabilities, so they are computed
    again from the rotated queries and the cached keys."""

    def __init__(self, layers: range, heads: int = 1) -> None:
        self.layers = set(layers)
        self.heads = heads
        self.probs: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.queries: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self._layer = 0

    def attention_context(self, cache_position: torch.Tensor, kv_length: int) -> torch.Tensor:
        self._layer, self.probs, self.values, self.queries, self.keys = 0, {}, {}, {}, {}  # once per forward
        return super().attention_context(cache_position, kv_length)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  key_cache: torch.Tensor, value_cache: torch.Tensor, cache_position: torch.Tensor,
                  context: torch.Tensor) -> torch.Tensor:
        out = super().attention(q, k, v, cos, sin, key_cache, value_cache, cache_position, context)
        if self._layer in self.layers:
            group = q.shape[2] // key_cache.shape[1]
            if self.heads > q.shape[2]:
                raise ValueError(f"AttentionProbe: {self.heads} heads asked, the model has {q.shape[2]}")
            kv = torch.arange(self.heads) // group   # the kv head each probed query head reads
            query = apply_rotary(q[:, :, :self.heads].transpose(1, 2), cos[:, None], sin[:, None])  # [B, heads, T, D]
            keys = key_cache[:, kv, :context.shape[-1]].to(query.dtype)  # [B, heads, S, D], rotated when cached
            scores = (query @ keys.transpose(2, 3)) / math.sqrt(query.shape[-1])
            self.probs[self._layer] = scores.masked_fill(~context.unsqueeze(-3), float("-inf")).softmax(dim=-1)
            self.values[self._layer] = value_cache[:, :int(kv[-1]) + 1, :context.shape[-1]]
            self.queries[self._layer], self.keys[self._layer] = query, keys
        self._layer += 1
        return out


def lookup_loss(probs: dict[int, torch.Tensor], ids: torch.Tensor, positions: torch.Tensor, examples: list[Example],
                cfg: RexOmniConfig, token_ids: TokenIds, slots: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Training-only supervision of the look-up itself: where the answer writes a box's four
    coordinates, head 0 of the probed layers puts its attention on the image tokens of that box
    (-log of the attention mass there, mean over the positions that predict x0, y0, x1, y1);
    where it answers a category ``None``, on <|vision_start|> (found nothing: a fixed sink, so
    that what the head reads tells present from absent). ``probs``: per layer [B, heads, T, S].

    With ``slots``, query head s (0..3) looks up the box only at the position that predicts slot s
    and rests on <|vision_start|> at the other three (and at ``None``). x and y share one set of
    coordinate tokens, so an output that carries the whole box must be told which coordinate to
    write; here each head's own output projection can map the box it reads straight to its slot's
    coordinate, and the choice of slot is which head attends (runs H-J: one head looking at all four
    slots learned x1, y1 given x0, y0 but left x0 / y0 near the prior).
    Without it, runs learned the answer's format, box sizes and each image token's own category
    and box (the object losses) but never which tokens the named category is: the answer's
    coordinates are ~4 sparse, noisy signals per box for a two-step search (the name from the
    phrase, then the tokens that carry it). Returns (loss, {"lookup_mass": mean mass})."""
    coord_start, num_coords = token_ids.coord_start, token_ids.num_coords
    g = image_grid(ids, positions, cfg.image_token_id)
    classes, boxes = object_targets(g, examples)
    token_batch, token_index = g["mask"].nonzero(as_tuple=True)
    heads = SLOTS if slots else 1
    rows, queries, masks, head_index = [], [], [], []

    def target(b: int, query: int, head: int, mask: torch.Tensor) -> None:
        rows.append(b)
        queries.append(query)
        head_index.append(head)
        masks.append(mask)

    for b, example in enumerate(examples):
        tokens = example.input_ids
        sink = torch.from_numpy(tokens == cfg.vision_start_token_id)
        sink = torch.cat([sink, sink.new_zeros(ids.shape[1] - len(sink))])
        for query in range(example.num_prompt - 1, len(tokens) - 1):
            if tokens[query] == token_ids.box_start and tokens[query + 1] == token_ids.none[0]:
                for head in range(heads):
                    target(b, query, head, sink)
        coords = [i for i in range(example.num_prompt, len(example.input_ids))
                  if coord_start <= example.input_ids[i] < coord_start + num_coords]
        for first in coords[::4]:
            box = torch.tensor([int(example.input_ids[first + j]) - coord_start for j in range(4)], dtype=torch.float32)
            on_box = (token_batch == b) & (classes != BACKGROUND) & (boxes == box).all(dim=1)
            if not bool(on_box.any()):
                continue  # hidden under another shape
            mask = torch.zeros(ids.shape[1], dtype=torch.bool)
            mask[token_index[on_box]] = True
            for slot, query in enumerate(range(first - 1, first + 3)):  # the positions predicting x0, y0, x1, y1
                for head in range(heads):
                    target(b, query, head, mask if head == slot or not slots else sink)
    if not rows:
        return ids.new_zeros((), dtype=torch.float32), {}
    rows_t, queries_t, heads_t = (torch.tensor(x) for x in (rows, queries, head_index))
    wanted = torch.stack(masks)
    masses = [(p[rows_t, heads_t, queries_t] * wanted).sum(dim=-1) for p in probs.values()]  # each [N]
    loss = torch.stack([-(m + 1e-6).log().mean() for m in masses]).mean()
    return loss, {"lookup_mass": float(torch.stack(masses).detach().mean())}


def value_loss(model: RexOmniModel, value: torch.nn.ModuleDict, values: dict[int, torch.Tensor], ids: torch.Tensor,
               positions: torch.Tensor, examples: list[Example], coord_start: int, num_coords: int, sigma: float,
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Training-only: what the look-up reads. Each object token's value in the probed kv heads
    (``values``: per layer [B, G, S, D]; kv head 0 alone unless the look-up has a head per slot) of the
    probed layers names its shape's box (x0, y0, x1, y1 as coordinate bins, through ``value[str(layer)]``,
    head_dim -> 4 x hidden, and the tied coordinate rows), so that attending to a box's tokens
    brings its box to the answer. The object loss puts the box in the final hidden states, which
    the look-up layers' values are not. Returns (loss, {"value_mae": mean bin error})."""
    g = image_grid(ids, positions, model.config.image_token_id)
    classes, boxes = object_targets(g, examples)
    on_object = classes != BACKGROUND
    if not bool(on_object.any()):
        return ids.new_zeros((), dtype=torch.float32), {}
    coord_rows = model.head_weight[coord_start:coord_start + num_coords]
    losses, errors = [], []
    for layer, layer_values in values.items():
        for kv_head in range(layer_values.shape[1]):   # one readout per layer, shared by its kv heads
            tokens = layer_values[:, kv_head][g["mask"]][on_object]
            readout = value[str(layer)](tokens).view(-1, 4, coord_rows.shape[1])
            loss, expected = soft_bin_nll(readout, coord_rows, boxes[on_object], sigma)
            losses.append(loss)
            errors.append(float((expected - boxes[on_object]).abs().mean()))
    return torch.stack(losses).mean(), {"value_mae": float(np.mean(errors))}


def match_loss(match: torch.nn.ModuleDict, queries: dict[int, torch.Tensor], keys: dict[int, torch.Tensor],
               ids: torch.Tensor, positions: torch.Tensor, examples: list[Example], cfg: RexOmniConfig,
               box_start: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Training-only: the two sides of the look-up that finds a category's box speak of categories.
    At each <|box_start|> of the answer (where x0, or ``None``, is written: the search by content;
    the later slots find the box by the position x0 / y0 give) head 0's rotated query names the
    category its phrase asked for, and kv head 0's rotated key at every image token names the
    category under it (``BACKGROUND`` if none), both through one readout per probed layer
    (``match[str(layer)]``, head_dim -> categories + 1). One readout for both sides puts the named
    category and the token's category in the same directions of the head's space, which is what the
    query-key product needs to tell the named shape from others. Run J: head 0's mass at x0 was
    0.5 on the named box and ~0.25 on shapes of a different colour *and* shape, against 0.9-1.0
    at the other slots. Returns (loss, {"match_query_acc", "match_key_acc"})."""
    g = image_grid(ids, positions, cfg.image_token_id)
    classes, _ = object_targets(g, examples)
    rows, cols, asked = [], [], []
    for b, example in enumerate(examples):
        starts = [i for i in range(example.num_prompt, len(example.input_ids)) if example.input_ids[i] == box_start]
        if len(starts) != len(example.asked):
            raise ValueError(f"answer has {len(starts)} groups for {len(example.asked)} asked categories")
        rows += [b] * len(starts)
        cols += starts
        asked += example.asked
    rows_t, cols_t, asked_t = torch.tensor(rows), torch.tensor(cols), torch.tensor(asked)
    losses, query_right, key_right = [], [], []
    for layer in queries:
        query_logits = match[str(layer)](queries[layer][rows_t, 0, cols_t])
        key_logits = match[str(layer)](keys[layer][:, 0][g["mask"]])
        losses.append(F.cross_entropy(query_logits, asked_t) + F.cross_entropy(key_logits, classes))
        query_right.append((query_logits.argmax(dim=-1) == asked_t).float().mean())
        key_right.append((key_logits.argmax(dim=-1) == classes).float().mean())
    return torch.stack(losses).mean() / 2, {"match_query_acc": float(torch.stack(query_right).mean()),
                                             "match_key_acc": float(torch.stack(key_right).mean())}


def learning_rate(options: TrainOptions, step: int) -> float:
    if step < options.warmup_steps:
        return options.lr * (step + 1) / options.warmup_steps
    progress = min(1.0, (step - options.warmup_steps) / max(1, options.decay_steps))
    return options.min_lr + 0.5 * (options.lr - options.min_lr) * (1 + math.cos(math.pi * progress))


class Trainer:
    """Model, optimizer and step; ``save``/``load`` a resumable state; ``step`` one batch."""

    def __init__(self, options: TrainOptions, tokenizer: Tokenizer) -> None:
        self.options = options
        self.tokenizer = tokenizer
        self.cfg = RexOmniConfig.preset(options.preset)
        ids = tokenizer.ids
        self.coord_start, self.num_coords = ids.coord_start, ids.num_coords
        self.model = init_model(self.cfg, options, self.coord_start, self.num_coords)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=options.lr, betas=(0.9, 0.98))
        # the position loss's readout: training only (not in the checkpoint), with its own optimizer
        self.aux: torch.nn.Linear | None = None
        self.aux_optimizer: torch.optim.Optimizer | None = None
        if options.aux_weight > 0:
            hidden = self.cfg.hidden_size
            self.aux = torch.nn.Linear(hidden, 2 * hidden, bias=False)
            with torch.no_grad():
                self.aux.weight.copy_(torch.eye(hidden).repeat(2, 1))
            self.aux_optimizer = readout_optimizer(self.aux, options.lr)
        # the object losses' readouts: training only as well
        self.dense: torch.nn.ModuleDict | None = None
        self.dense_optimizer: torch.optim.Optimizer | None = None
        if options.box_weight > 0 or options.class_weight > 0:
            hidden = self.cfg.hidden_size
            self.dense = torch.nn.ModuleDict({"box": torch.nn.Linear(hidden, 4 * hidden, bias=False),
                                              "category": torch.nn.Linear(hidden, BACKGROUND + 1)})
            with torch.no_grad():
                self.dense["box"].weight.copy_(torch.eye(hidden).repeat(4, 1))
            self.dense_optimizer = readout_optimizer(self.dense, options.lr)
        # the look-up values' readouts, one per probed layer: training only as well
        self.value: torch.nn.ModuleDict | None = None
        self.value_optimizer: torch.optim.Optimizer | None = None
        if options.value_weight > 0:
            self.value = torch.nn.ModuleDict({str(layer): torch.nn.Linear(self.cfg.head_dim, 4 * self.cfg.hidden_size)
                                              for layer in probed_layers(self.cfg, options.lookup_layers)})
            self.value_optimizer = readout_optimizer(self.value, options.lr)
        # the look-up's category readouts (queries and keys), one per probed layer: training only as well
        self.match: torch.nn.ModuleDict | None = None
        self.match_optimizer: torch.optim.Optimizer | None = None
        if options.match_weight > 0:
            self.match = torch.nn.ModuleDict({str(layer): torch.nn.Linear(self.cfg.head_dim, BACKGROUND + 1)
                                              for layer in probed_layers(self.cfg, options.lookup_layers)})
            self.match_optimizer = readout_optimizer(self.match, options.lr)
        self.step = 0

    def scenes(self, step: int) -> list[Scene]:
        o = self.options
        max_shapes = o.curriculum_shapes if step < o.curriculum_steps else MAX_SHAPES
        return [make_scene(scene_seed(o.data_seed, step, i, o.batch_size), max_shapes=max_shapes)
                for i in range(o.batch_size)]

    def train_step(self) -> dict[str, float]:
        o = self.options
        examples = [make_example(s, self.tokenizer, self.cfg, o.min_pixels, o.max_pixels) for s in self.scenes(self.step)]
        lr = learning_rate(o, self.step)
        optimizers = [opt for opt in (self.optimizer, self.aux_optimizer, self.dense_optimizer, self.value_optimizer,
                                      self.match_optimizer) if opt is not None]
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        self.model.train()
        sigma = coord_sigma(o, self.step)
        loss, metrics = forward_loss(self.model, examples, self.tokenizer.ids, sigma, self.aux, o.aux_weight,
                                     self.dense, o.box_weight, o.class_weight, o.lookup_weight, o.lookup_layers,
                                     self.value, o.value_weight, o.lookup_slots, self.match, o.match_weight)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
        self.step += 1
        return {"loss": loss.item(), "lr": lr, "sigma": sigma, **metrics}

    def state(self) -> dict[str, Any]:
        return {"options": dataclasses.asdict(self.options), "step": self.step,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                **{name: state for readout in READOUTS if getattr(self, readout) is not None
                   for name, state in ((readout, getattr(self, readout).state_dict()),
                                       (readout + "_optimizer", getattr(self, readout + "_optimizer").state_dict()))}}

    def save(self, out: Path) -> None:
        """Write ``out/state.pt`` (resumable) and ``out/checkpoint`` (published layout), each replaced atomically."""
        out.mkdir(parents=True, exist_ok=True)
        partial = out / (STATE_FILE + ".partial")
        torch.save(self.state(), partial)
        os.replace(partial, out / STATE_FILE)
        staging = out / (CHECKPOINT_DIR + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        self.write_checkpoint(staging)
        old = out / (CHECKPOINT_DIR + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if (out / CHECKPOINT_DIR).exists():
            os.replace(out / CHECKPOINT_DIR, old)
        os.replace(staging, out / CHECKPOINT_DIR)
        shutil.rmtree(old, ignore_errors=True)

    def write_checkpoint(self, path: Path) -> Path:
        weights = self.model.state_dict()
        names = list(expected_tensor_shapes(self.cfg))

        def tensors(dtype: torch.dtype, token_rows: int):
            for name in names:
                yield name, weights[name].detach().to(dtype).contiguous()

        # the tokenizer it was trained with (shapes_tokenizer): written from the same phrases
        return write_checkpoint(path, self.cfg, tensors, "float32", min_pixels=self.options.min_pixels,
                                max_pixels=self.options.max_pixels, phrases=CATEGORIES)

    @classmethod
    def load(cls, out: Path, tokenizer: Tokenizer, changes: dict[str, Any] | None = None) -> "Trainer":
        """The state in ``out``; ``changes`` replace some of its options from now on (a readout that an
        option newly turns on starts fresh)."""
        state = torch.load(out / STATE_FILE, weights_only=False)
        trainer = cls(dataclasses.replace(TrainOptions(**state["options"]), **(changes or {})), tokenizer)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        for name in READOUTS:
            if getattr(trainer, name) is not None and name in state:
                getattr(trainer, name).load_state_dict(state[name])
                getattr(trainer, name + "_optimizer").load_state_dict(state[name + "_optimizer"])
        trainer.step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        return trainer


def shapes_tokenizer(directory: Path) -> Tokenizer:
    """The synthetic tokenizer of the "shapes" / "tiny" vocabulary, written once to ``directory``:
    the tiny tokenizer with the category words as whole tokens ("red", " circle", ...), as in a real
    vocabulary. Spelled in 5-7 pieces ("r" "ed" " c" "ir" "cle") a name must first be composed
    before the answer can look for it in the image; with the pieces, a run learned every other part
    of the task but answered absent categories with a box (2 of 24 right) and placed boxes no
    better than its prior."""
    from rexedge.export.fixtures.tiny_tokenizer import QWEN_SPECIAL_TOKENS, write_tiny_tokenizer

    cfg = RexOmniConfig.preset("shapes")
    if not (directory / "tokenizer_config.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_tiny_tokenizer(directory, num_ordinary=cfg.image_token_id - QWEN_SPECIAL_TOKENS.index("<|image_pad|>"),
                             phrases=CATEGORIES)
    return Tokenizer.from_dir(directory)


def open_trainer(out: Path, options: TrainOptions, changes: dict[str, Any] | None = None) -> Trainer:
    """Resume from ``out/state.pt`` when it exists (its options win, but for ``changes``), else start
    fresh with ``options``."""
    tokenizer = shapes_tokenizer(out / "tokenizer")
    if (out / STATE_FILE).exists():
        return Trainer.load(out, tokenizer, changes)
    options = dataclasses.replace(options, **(changes or {}))
    if options.preset not in TRAINABLE_PRESETS:
        raise RexEdgeError(f"preset {options.preset!r}: training uses the synthetic vocabulary, one of "
                           f"{', '.join(TRAINABLE_PRESETS)}")
    return Trainer(options, tokenizer)


def log_line(log: Path, record: dict[str, Any]) -> None:
    with log.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def train(out: Path, steps: int, options: TrainOptions, save_every_s: float = 300.0, log_every: int = 10,
          probe_every: int = 0, probe_scenes: int = 24, changes: dict[str, Any] | None = None) -> Trainer:
    """Train until ``steps`` steps in total (resuming from ``out``), saving every ``save_every_s`` seconds.
    ``changes`` replace options of a resumed run from its current step on (logged)."""
    trainer = open_trainer(out, options, changes)
    log = out / LOG_FILE
    out.mkdir(parents=True, exist_ok=True)
    if changes:
        log_line(log, {"step": trainer.step, "changed": changes})
    last_save = time.monotonic()
    window: list[dict[str, float]] = []
    t_window = time.monotonic()
    stop = _StopRequest()
    while trainer.step < steps and not stop.requested:
        window.append(trainer.train_step())
        if trainer.step % log_every == 0 or trainer.step == steps:
            now = time.monotonic()
            record = {"step": trainer.step, "s_per_step": round((now - t_window) / len(window), 3)}
            record.update({k: float(f"{np.mean([w[k] for w in window]):.4g}") for k in window[0]})
            log_line(log, record)
            window, t_window = [], now
        if time.monotonic() - last_save > save_every_s or trainer.step == steps:
            trainer.save(out)
            last_save = time.monotonic()
        if probe_every and trainer.step % probe_every == 0:
            trainer.save(out)
            last_save = time.monotonic()
            log_line(log, {"step": trainer.step, "probe": probe(out, trainer, probe_scenes)})
            t_window = time.monotonic()
    if stop.requested:
        trainer.save(out)
        log_line(log, {"step": trainer.step, "stopped": "signal; state saved"})
    stop.restore()
    return trainer


class _StopRequest:
    """SIGTERM / SIGINT end the run after the current step, saved (so `kill PID` loses nothing)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def probe(out: Path, trainer: Trainer, scenes: int) -> dict[str, float]:
    """Accuracy through the real runtime (export to a bundle, ort, structured decoding) on fresh scenes."""
    from rexedge.export.shapes.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(out / CHECKPOINT_DIR, scenes=scenes, min_pixels=trainer.options.min_pixels,
                               max_pixels=trainer.options.max_pixels, work=out / "probe")


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def _parse_change(text: str, parser: argparse.ArgumentParser) -> tuple[str, Any]:
    """"box_weight=1" -> ("box_weight", 1.0), typed by the option's default."""
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(TrainOptions)}
    if not sep or name not in fields:
        parser.error(f"--change {text!r}: expected OPTION=VALUE with OPTION one of {', '.join(fields)}")
    kind = type(getattr(TrainOptions(), name))
    try:
        return name, (_parse_bool(value) if kind is bool else kind(value))
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(f"--change {text!r}: {error}")


def main(argv: list[str] | None = None) -> None:
    defaults = TrainOptions()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="state, checkpoint and log directory (resumed if it holds state.pt)")
    parser.add_argument("--steps", type=int, required=True, help="train until this many steps in total")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=float, default=300.0, help="seconds between saves")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--probe-every", type=int, default=0, help="steps between accuracy probes (0: none)")
    parser.add_argument("--probe-scenes", type=int, default=24)
    for field in dataclasses.fields(TrainOptions):
        kind = type(getattr(defaults, field.name))
        parser.add_argument("--" + field.name.replace("_", "-"), type=_parse_bool if kind is bool else kind,
                            default=getattr(defaults, field.name),
                            help="(new runs only; a resumed run keeps its options)")
    parser.add_argument("--change", action="append", default=[], metavar="OPTION=VALUE",
                        help="change an option of a resumed run from its current step on (repeatable; logged); "
                             "to branch off a run, copy its directory first")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})
    changes = dict(_parse_change(text, parser) for text in args.change)
    trainer = train(args.out, args.steps, options, args.save_every, args.log_every, args.probe_every, args.probe_scenes,
                    changes)
    print(f"step {trainer.step}; state in {args.out / STATE_FILE}, checkpoint in {args.out / CHECKPOINT_DIR}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
