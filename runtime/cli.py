"""The ``rexedge`` command.

Parsers are declared here; each handler imports its module only when it runs, so that
``rexedge --help`` and the torch-free commands never import torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rexedge.runtime.errors import RexEdgeError


def _tiny_checkpoint(args: argparse.Namespace) -> None:
    from rexedge.export.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.out, preset=args.preset, seed=args.seed)
    print(f"wrote a {args.preset} checkpoint (random weights, seed {args.seed}) to {path}")


def _prompt(args: argparse.Namespace) -> None:
    from rexedge.runtime.prompts import prompt_command

    prompt_command(args)


def _export(args: argparse.Namespace) -> None:
    from rexedge.export.bundle import export_command

    export_command(args)


def _result_json(source: str, result: dict) -> dict:
    from rexedge.runtime.results import detections_to_json

    keep = ("task", "image_size", "resized_size", "prompt", "raw_output", "extracted_predictions", "absent",
            "stop_reason", "num_prompt_tokens", "num_output_tokens", "inference_time", "tokens_per_second", "timings")
    return {"image": source, **{k: result[k] for k in keep}, "detections": detections_to_json(result["detections"])}


def _annotate(image, result: dict, out: Path) -> None:
    from rexedge.runtime.draw import draw_detections
    from rexedge.runtime.preprocess import load_image

    # keypoint answers are parsed from the text; every other task has typed detections with scores
    drawn = result["extracted_predictions"] if result["task"] == "keypoint" else result["detections"]
    draw_detections(load_image(image), drawn).save(out)


def _run_detect(images: list, names: list[str], args: argparse.Namespace, model_path) -> list[dict]:
    from rexedge.runtime.api import RexOmni
    from rexedge.runtime.prompts import parse_boxes, parse_categories

    model = RexOmni(model_path, backend=args.backend, device=args.device, decoding=args.decoding,
                    max_tokens=args.max_new_tokens)
    boxes = parse_boxes(args.visual_prompt_boxes) if args.visual_prompt_boxes else None
    categories = parse_categories(args.categories) if args.categories is not None else None
    records = []
    for index, (image, name) in enumerate(zip(images, names)):
        [result] = model.inference(image, task=args.task, categories=categories, keypoint_type=args.keypoint_type,
                                   visual_prompt_boxes=boxes)
        records.append(_result_json(name, result))
        if args.annotate:
            out = Path(args.annotate)
            if len(images) > 1:
                out = out.with_name(f"{out.stem}_{index}{out.suffix}")
            _annotate(image, result, out)
            print(f"wrote {out}", file=sys.stderr)
    return records


def _emit(records: list[dict], json_out: str | None) -> None:
    text = json.dumps(records, indent=2)
    if json_out:
        Path(json_out).write_text(text + "\n")
        print(f"wrote {json_out}", file=sys.stderr)
    else:
        print(text)


def _detect(args: argparse.Namespace) -> None:
    _emit(_run_detect(args.images, args.images, args, args.model), args.json)


def _demo(args: argparse.Namespace) -> None:
    from rexedge.runtime.demo import DEMO_BUNDLE, DEMO_CATEGORIES, DEMO_IMAGE

    print("rexedge demo: the embedded default model has RANDOM weights (no trained default model ships yet); "
          "its detections show that the pipeline runs, not what Rex-Omni sees.", file=sys.stderr)
    args.task, args.categories, args.keypoint_type, args.visual_prompt_boxes = "detection", DEMO_CATEGORIES, None, None
    args.decoding, args.device = "structured", "cpu"
    records = _run_detect([str(DEMO_IMAGE)], [DEMO_IMAGE.name], args, DEMO_BUNDLE)
    _emit(records, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rexedge", description="Rex-Omni on the edge: export, run, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tiny-checkpoint", help="write a small random checkpoint in the published layout (for tests)")
    p.add_argument("out", help="directory to write")
    p.add_argument("--preset", default="tiny", help="config preset (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_tiny_checkpoint)

    p = sub.add_parser("prompt", help="show the prompt, token ids and image grid the model will see")
    p.add_argument("--model", required=True, help="checkpoint or bundle directory (only tokenizer and config are read)")
    p.add_argument("--task", required=True)
    p.add_argument("--categories", help="comma-separated categories")
    p.add_argument("--visual-prompt-boxes", help="boxes in pixels: 'x0,y0,x1,y1;x0,y0,x1,y1'")
    p.add_argument("--keypoint-type", choices=["person", "animal"])
    p.add_argument("--image-size", required=True, help="original image size WxH, e.g. 640x480")
    p.add_argument("--min-pixels", type=int)
    p.add_argument("--max-pixels", type=int)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=_prompt)

    p = sub.add_parser("export", help="export a checkpoint to a bundle (ONNX graphs, head, tokenizer, manifest)")
    p.add_argument("checkpoint", help="checkpoint directory (published Rex-Omni layout)")
    p.add_argument("--out", required=True, help="bundle directory to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="graph precision (default: fp32)")
    p.add_argument("--flavour", default="ort", help="decoder graph flavour (default: ort)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=_export)

    p = sub.add_parser("detect", help="run a task on images and print the results as JSON")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", required=True, help="bundle directory (ort) or checkpoint directory (torch)")
    p.add_argument("--backend", default="ort", help="ort (default) or torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--task", default="detection")
    p.add_argument("--categories", help="comma-separated categories")
    p.add_argument("--keypoint-type", choices=["person", "animal"])
    p.add_argument("--visual-prompt-boxes", help="boxes in pixels: 'x0,y0,x1,y1;x0,y0,x1,y1'")
    p.add_argument("--decoding", choices=["structured", "exact"], default="structured")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--json", metavar="OUT", help="write the JSON here instead of printing it")
    p.add_argument("--annotate", metavar="OUT.png", help="draw the results (one file per image: OUT_i.png)")
    p.set_defaults(handler=_detect)

    p = sub.add_parser("demo", help="detection on the bundled sample image with the embedded default model")
    p.add_argument("--annotate", default="rexedge-demo.png", metavar="OUT.png", help="annotated image to write")
    p.add_argument("--json", metavar="OUT", help="write the JSON here instead of printing it")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(handler=_demo, backend="ort")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except RexEdgeError as e:
        print(f"rexedge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rexedge {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
