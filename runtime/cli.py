"""The ``rexedge`` command.

Parsers are declared here; each handler imports its module only when it runs, so that
``rexedge --help`` and the torch-free commands never import torch.
"""

from __future__ import annotations

import argparse
import sys

from rexedge.runtime.errors import RexEdgeError


def _tiny_checkpoint(args: argparse.Namespace) -> None:
    from rexedge.export.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.out, preset=args.preset, seed=args.seed)
    print(f"wrote a {args.preset} checkpoint (random weights, seed {args.seed}) to {path}")


def _prompt(args: argparse.Namespace) -> None:
    from rexedge.runtime.prompts import prompt_command

    prompt_command(args)


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
