"""``rexedge prompt``: the prompt, token ids and image grid the model will see (no weights read)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rexedge.runtime.bundle import MANIFEST, load_bundle
from rexedge.runtime.cli.options import parse_boxes, parse_categories
from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.request.preprocess import smart_resize
from rexedge.runtime.request.prompts import PromptError, build_task_prompt, encode_prompt
from rexedge.runtime.request.tokenizer import Tokenizer


def prompt_command(args: argparse.Namespace) -> None:
    """``rexedge prompt``: the prompt, token ids and image grid the model will see (no weights read)."""
    width, height = _parse_image_size(args.image_size)
    tokenizer, config, own_pixels = _model_files(Path(args.model))
    # as RexOmni resizes: the limits given, else the bundle's own range, else the official defaults
    own = dict(zip(("min_pixels", "max_pixels"), own_pixels)) if own_pixels else {}
    limits = (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels))
    pixel_limits = {**own, **{name: value for name, value in limits if value is not None}}
    resized_h, resized_w = smart_resize(height, width, config.image_factor, **pixel_limits)
    grid = (1, resized_h // config.patch_size, resized_w // config.patch_size)
    num_image_tokens = grid[1] * grid[2] // config.merge_unit

    categories = parse_categories(args.categories) if args.categories is not None else None
    boxes = parse_boxes(args.visual_prompt_boxes) if args.visual_prompt_boxes is not None else None
    task_prompt = build_task_prompt(args.task, categories, args.keypoint_type, boxes, (width, height))
    token_ids = encode_prompt(tokenizer, tokenizer.ids, task_prompt, num_image_tokens)

    report = {
        "task": task_prompt.task,
        "prompt": task_prompt.text,
        "image_size": [width, height],
        "resized_size": [resized_w, resized_h],
        "image_grid_thw": list(grid),
        "num_image_tokens": num_image_tokens,
        "num_prompt_tokens": len(token_ids),
        "token_ids": token_ids,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"task:              {report['task']}")
    print(f"prompt:            {report['prompt']}")
    print(f"image size (WxH):  {width}x{height} -> resized {resized_w}x{resized_h}")
    print(f"image grid (thw):  {grid[0]} x {grid[1]} x {grid[2]} patches -> {num_image_tokens} image tokens")
    print(f"num_prompt_tokens: {len(token_ids)}")
    print(f"token_ids:         {' '.join(map(str, token_ids))}")


def _model_files(model: Path) -> tuple[Tokenizer, RexOmniConfig, tuple[int, int] | None]:
    """Tokenizer, config and the model's own pixel range (a bundle's, else None): from a bundle
    (manifest.json + tokenizer.json) or a checkpoint (config.json + tokenizer files)."""
    if (model / MANIFEST).is_file():
        bundle = load_bundle(model, verify_hashes=False)
        return bundle.load_tokenizer(), bundle.config, bundle.pixels
    return Tokenizer.from_dir(model), RexOmniConfig.from_json(model), None


def _parse_image_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise PromptError(f"--image-size must be WxH with positive integers, e.g. 640x480; got {text!r}")
    return int(parts[0]), int(parts[1])
