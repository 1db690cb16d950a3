"""``rexedge batch``: many images to resumable JSON lines (and COCO), in one process or on Ray."""

from __future__ import annotations

import argparse
import sys

from rexedge.runtime.cli import model_from_args, model_spec
from rexedge.runtime.cli.options import parse_boxes, parse_categories
from rexedge.runtime.pipelines.batch import BatchError, plan_batch, run_plan


def batch_command(args: argparse.Namespace) -> None:
    categories = parse_categories(args.categories) if args.categories is not None else None
    boxes = parse_boxes(args.visual_prompt_boxes) if args.visual_prompt_boxes else None
    options = dict(task=args.task, categories=categories, keypoint_type=args.keypoint_type, visual_prompt_boxes=boxes,
                   coco=args.coco, category_ids=args.category_ids, image_ids=args.image_ids)
    ray_options = {"address": args.address, "actors": args.actors, "gpus_per_actor": args.gpus_per_actor}
    if args.ray:
        from rexedge.runtime.pipelines.ray_batch import run_batch_ray

        model_path, model_options = model_spec(args)
        given = {key: value for key, value in ray_options.items() if value is not None}
        summary = run_batch_ray(model_path, args.inputs, args.out, model_options=model_options,
                                max_batch=model_options.pop("max_batch", 1), **given, **options)
    else:
        unused = [f"--{key.replace('_', '-')}" for key, value in ray_options.items() if value is not None]
        if unused:
            raise BatchError(f"{', '.join(unused)}: options of a Ray run; add --ray")
        plan = plan_batch(args.inputs, args.out, **options)   # every check before the model loads
        summary = run_plan(model_from_args(args), plan)
    print(summary, file=sys.stderr)
