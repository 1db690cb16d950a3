"""The ``rexedge`` command.

Parsers are declared here; each handler imports its module only when it runs, so that
``rexedge --help`` and the torch-free commands never import torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.results.result import Result


def _tiny_checkpoint(args: argparse.Namespace) -> None:
    from rexedge.export.fixtures.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.out, preset=args.preset, seed=args.seed, padding_rows=args.padding_rows)
    print(f"wrote a {args.preset} checkpoint (random weights, seed {args.seed}) to {path}")


def _prompt(args: argparse.Namespace) -> None:
    from rexedge.runtime.cli.prompt import prompt_command

    prompt_command(args)


def _export(args: argparse.Namespace) -> None:
    from rexedge.export.bundle import export_command

    export_command(args)


def _build(args: argparse.Namespace) -> None:
    from rexedge.export.tensorrt.engine import build_command

    build_command(args)


def _prepack(args: argparse.Namespace) -> None:
    from rexedge.export.prepack import prepack_bundle, remove_prepacked

    if args.remove:
        remove_prepacked(args.bundle, progress=not args.quiet)
    else:
        prepack_bundle(args.bundle, threads=args.threads, progress=not args.quiet)


def _calibrate(args: argparse.Namespace) -> None:
    try:
        from rexedge.calib.quantize import calibrate_command
    except ModuleNotFoundError as e:
        raise RexEdgeError(f"calibrate needs {e.name}, which is not installed: pip install 'rexedge[int8]'") from None

    calibrate_command(args)


def _annotate(image, result: Result, out: Path) -> None:
    from rexedge.runtime.request.preprocess import load_image
    from rexedge.runtime.results.draw import draw_detections

    try:
        draw_detections(load_image(image), result.drawable).save(out)
    except OSError as e:
        raise RexEdgeError(f"--annotate {out}: cannot write the image ({e})") from None


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that cannot be written before any image is run."""
    for flag, path in (("--json", args.json), ("--annotate", args.annotate)):
        if path and not Path(path).resolve().parent.is_dir():
            raise RexEdgeError(f"{flag} {path}: the directory {Path(path).resolve().parent} does not exist")
    if args.annotate:
        from PIL import Image

        Image.init()
        if Path(args.annotate).suffix.lower() not in Image.registered_extensions():
            raise RexEdgeError(f"--annotate {args.annotate}: not an image file name Pillow can write "
                               f"(expected e.g. .png or .jpg)")


def check_request(args: argparse.Namespace) -> tuple[list[str] | None, list[list[float]] | None]:
    """Categories and boxes from the command line, with the task's needs checked once, before the model
    loads (whether the boxes lie inside an image is checked per image)."""
    from rexedge.runtime.cli.options import parse_boxes, parse_categories
    from rexedge.runtime.request.prompts import PromptError, build_task_prompt

    boxes = parse_boxes(args.visual_prompt_boxes) if args.visual_prompt_boxes else None
    categories = parse_categories(args.categories) if args.categories is not None else None
    if args.task == "visual_prompting":
        if boxes is None:
            raise PromptError("visual_prompting needs --visual-prompt-boxes 'x0,y0,x1,y1;...' (pixels)")
    else:
        build_task_prompt(args.task, categories, args.keypoint_type)
    return categories, boxes


def _named(error: RexEdgeError, name: str) -> str:
    """An image's error message: errors about the file name it already; the others (e.g. a box outside it)
    get its name."""
    return str(error) if str(error).startswith(str(name)) else f"{name}: {error}"


def _check_images(images: list, names: list[str], args: argparse.Namespace, categories: list[str] | None,
                  boxes: list[list[float]] | None) -> dict[int, str]:
    """Open every image and check the request against its size, before the model loads (a large model takes
    seconds to minutes to load): the failure message of each image that cannot run, by index."""
    from rexedge.runtime.request.preprocess import load_image
    from rexedge.runtime.request.prompts import build_task_prompt

    failures = {}
    for index, (image, name) in enumerate(zip(images, names)):
        try:
            size = load_image(image).size
            if boxes is not None:
                build_task_prompt(args.task, categories, args.keypoint_type, boxes, size)
        except RexEdgeError as e:
            failures[index] = _named(e, name)
    return failures


def _run_detect(images: list, names: list[str], args: argparse.Namespace, model_path) -> tuple[list[dict], list[str]]:
    """One record per image and the failures; a bad image is recorded and the others still run. The model is
    loaded only when some image can run."""
    categories, boxes = check_request(args)
    _check_outputs(args)
    early = _check_images(images, names, args, categories, boxes)
    model = model_from_args(args, model_path) if len(early) < len(images) else None
    records, failures = [], []
    for index, (image, name) in enumerate(zip(images, names)):
        message = early.get(index)
        if message is None:
            try:
                [official] = model.inference(image, task=args.task, categories=categories,
                                             keypoint_type=args.keypoint_type, visual_prompt_boxes=boxes)
                result = Result.from_official(official)
            except RexEdgeError as e:
                message = _named(e, name)
        if message is not None:
            records.append({"image": name, "success": False, "error": message})
            failures.append(message)
            continue
        records.append({"image": name, **result.to_json()})
        if args.annotate:
            out = Path(args.annotate)
            if len(images) > 1:
                out = out.with_name(f"{out.stem}_{index}{out.suffix}")
            _annotate(image, result, out)
            print(f"wrote {out}", file=sys.stderr)
    return records, failures


def _emit(records: list[dict], json_out: str | None) -> None:
    text = json.dumps(records, indent=2)
    if json_out:
        try:
            Path(json_out).write_text(text + "\n")
        except OSError as e:
            raise RexEdgeError(f"--json {json_out}: cannot write ({e.strerror})") from None
        print(f"wrote {json_out}", file=sys.stderr)
    else:
        print(text)


def _raise_failures(failures: list[str], total: int) -> None:
    """After the results are out: a non-zero exit when any image failed, with every failure on one line."""
    if len(failures) == 1 and total == 1:
        raise RexEdgeError(failures[0])
    if failures:
        raise RexEdgeError(f"{len(failures)} of {total} images failed: {'; '.join(failures)}")


def _detect(args: argparse.Namespace) -> None:
    records, failures = _run_detect(args.images, args.images, args, args.model)
    _emit(records, args.json)
    _raise_failures(failures, len(args.images))


def _demo(args: argparse.Namespace) -> None:
    from rexedge.runtime.demo import DEMO_BUNDLE, DEMO_CATEGORIES, DEMO_IMAGE, DEMO_MODEL

    print(f"rexedge demo: the embedded default model is {DEMO_MODEL}.", file=sys.stderr)
    args.task, args.categories, args.keypoint_type, args.visual_prompt_boxes = "detection", DEMO_CATEGORIES, None, None
    # each category answered at most once, under its own name; a box rather than "None" when the coordinates'
    # total probability is the larger (the trained shapes model's best mode: docs/shapes_model.md)
    args.decoding, args.device, args.constrain_phrases = "structured", "cpu", True
    records, failures = _run_detect([str(DEMO_IMAGE)], [DEMO_IMAGE.name], args, DEMO_BUNDLE)
    _emit(records, args.json)
    _raise_failures(failures, 1)


def _video(args: argparse.Namespace) -> None:
    from rexedge.runtime.cli.video import video_command

    video_command(args)


def _batch(args: argparse.Namespace) -> None:
    from rexedge.runtime.cli.batch import batch_command

    batch_command(args)


def _add_request_options(p: argparse.ArgumentParser) -> None:
    """The model and request options of every command that runs the model (detect, video, batch)."""
    p.add_argument("--model", required=True, help="bundle directory (ort, trt), checkpoint directory (torch), "
                   "or 'demo': the embedded default bundle (the small shapes model)")
    p.add_argument("--backend", default="ort", help="ort (default), torch or trt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--task", default="detection")
    p.add_argument("--categories", help="comma-separated categories")
    p.add_argument("--keypoint-type", choices=["person", "animal"])
    p.add_argument("--visual-prompt-boxes", help="boxes in pixels: 'x0,y0,x1,y1;x0,y0,x1,y1'")
    p.add_argument("--decoding", choices=["structured", "exact"], default="structured")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--constrain-phrases", action="store_true",
                   help="structured detection/pointing: each phrase is one of the categories, each at most once "
                   "(default: free text)")
    p.add_argument("--none-by-mass", action="store_true",
                   help="structured: answer a category with a box when the coordinate tokens' total probability "
                   "exceeds that of None (default: the single most likely token decides)")


def model_from_args(args: argparse.Namespace, model_path=None):
    """The RexOmni that the request options ask for (``model_path`` overrides --model)."""
    from rexedge.runtime.api import RexOmni

    path, options = model_spec(args, model_path)
    start = time.perf_counter()
    model = RexOmni(path, **options)
    print(f"loaded {path} ({options['backend']}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model


def model_spec(args: argparse.Namespace, model_path=None) -> tuple[Path, dict]:
    """The model path (``demo``: the embedded bundle) and the RexOmni options the request options ask for."""
    from rexedge.runtime.demo import DEMO_BUNDLE

    model_path = args.model if model_path is None else model_path
    if str(model_path) == "demo" and not Path("demo").exists():
        model_path = DEMO_BUNDLE
    options = dict(backend=args.backend, device=args.device, decoding=args.decoding, max_tokens=args.max_new_tokens,
                   constrain_phrases=args.constrain_phrases, none_by_mass=args.none_by_mass)
    if getattr(args, "max_batch", None) is not None:   # commands that decode several images together
        options["max_batch"] = args.max_batch
    return Path(model_path), options


def _bench(args: argparse.Namespace) -> None:
    from rexedge.bench.harness import bench_command

    bench_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rexedge", description="Rex-Omni on the edge: export, run, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tiny-checkpoint", help="write a small random checkpoint in the published layout (for tests)")
    p.add_argument("out", help="directory to write")
    p.add_argument("--preset", default="tiny", help="config preset (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--padding-rows", choices=["zero", "random"], default="zero",
                   help="embedding rows past the tokenizer's ids: zero (default), or random as in a real checkpoint")
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
    p.add_argument("--flavour", default="ort", help="decoder graph flavour: ort (default) or trt (TensorRT)")
    p.add_argument("--weights", choices=["int4", "int8"],
                   help="quantize the decoder's linear weights (ONNX Runtime MatMulNBits, ort flavour, fp32); "
                        "default: float weights in the graph precision")
    p.add_argument("--vision-weights", choices=["int8"],
                   help="the vision encoder with int8 weights and activations (ONNX Runtime's dynamic quantization, "
                        "ort flavour, fp32): ~5x faster on a CPU with VNNI; default float32 (see docs)")
    p.add_argument("--min-pixels", type=int, help="with --max-pixels: the image-size range the model was trained for, "
                   "recorded as the bundle's default (default: the official wrapper's, 16*28*28 .. 2560*28*28)")
    p.add_argument("--max-pixels", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=_export)

    p = sub.add_parser("build", help="build TensorRT engines for this GPU from a trt-flavour bundle")
    p.add_argument("bundle", help="bundle directory (rexedge export --flavour trt)")
    p.add_argument("--precision", choices=["fp16", "int8"], default="fp16", help="engine precision (default: fp16)")
    p.add_argument("--calib", metavar="DIR", help="int8: the Q/DQ bundle written by `rexedge calibrate` from BUNDLE "
                   "(its graphs are built and its manifest records the engines)")
    p.add_argument("--workspace", type=float, metavar="GB", help="TensorRT workspace limit in GB (default: TensorRT's)")
    p.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache to read and update (faster rebuilds)")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (default: cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=_build)

    p = sub.add_parser("prepack", help="save ONNX Runtime's prepacked weights for this CPU in a bundle (faster loads)")
    p.add_argument("bundle", help="bundle directory (rexedge export, ort flavour)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    p.add_argument("--remove", action="store_true", help="remove this CPU's prepacked graphs instead (disk)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=_prepack)

    p = sub.add_parser("calibrate", help="INT8: calibrate an fp32 bundle on your images and write Q/DQ graphs")
    p.add_argument("bundle", help="fp32 bundle directory (rexedge export), any flavour")
    p.add_argument("--images", required=True, metavar="DIR", help="directory of calibration images (like deployment)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks whose prompts to mix (default: all tasks)")
    p.add_argument("--num", type=int, default=16, help="calibration samples, an image with a task prompt (default: 16)")
    p.add_argument("--steps", type=int, default=8, help="decode steps calibrated per sample (default: 8)")
    p.add_argument("--max-pixels", type=int, default=2560 * 28 * 28, help="image size limit, as at inference")
    p.add_argument("--seed", type=int, default=0, help="seed of the task / category mix")
    p.add_argument("--out", metavar="BUNDLE_INT8", help="int8 bundle to write (default: BUNDLE-int8)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=_calibrate)

    p = sub.add_parser("detect", help="run a task on images and print the results as JSON")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    _add_request_options(p)
    p.add_argument("--json", metavar="OUT", help="write the JSON here instead of printing it")
    p.add_argument("--annotate", metavar="OUT.png", help="draw the results (one file per image: OUT_i.png)")
    p.set_defaults(handler=_detect)

    p = sub.add_parser("demo", help="detection on the bundled sample image with the embedded default model")
    p.add_argument("--annotate", default="rexedge-demo.png", metavar="OUT.png", help="annotated image to write")
    p.add_argument("--json", metavar="OUT", help="write the JSON here instead of printing it")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(handler=_demo, backend="ort", none_by_mass=True)

    p = sub.add_parser("video", help="detections frame by frame from a video file, camera, URL or GStreamer pipeline")
    p.add_argument("input", metavar="INPUT", help="video file, camera index (0, 1, ...), URL, or GStreamer pipeline")
    _add_request_options(p)
    p.add_argument("--out", required=True, metavar="RESULTS.jsonl", help="one JSON line per frame / image")
    p.add_argument("--annotate", metavar="OUT.mp4", help="write the processed frames with the results drawn (.mp4/.avi)")
    p.add_argument("--annotate-fps", type=float, help="frame rate of --annotate (default: the source's / --every; "
                   "5 for live sources)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="process every N-th frame of a file")
    p.add_argument("--live", action=argparse.BooleanOptionalAction, default=None,
                   help="latest frame wins, stale frames are dropped (default: cameras, URLs and pipelines)")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N processed frames")
    p.set_defaults(handler=_video)

    p = sub.add_parser("batch", help="run a task on many images to resumable JSONL (and COCO) results")
    p.add_argument("inputs", nargs="+", metavar="INPUTS", help="folders, globs, list files (.txt) or images")
    _add_request_options(p)
    p.add_argument("--out", required=True, metavar="RESULTS.jsonl", help="one JSON line per frame / image")
    p.add_argument("--coco", metavar="OUT.json", help="also write the results in the COCO results format")
    p.add_argument("--category-ids", metavar="MAP.json", help="{phrase: id} or a COCO annotation file (with --coco)")
    p.add_argument("--image-ids", metavar="MAP.json",
                   help="{file name: id} or a COCO annotation file (with --coco; default: numeric file names)")
    p.add_argument("--max-batch", type=int, metavar="N", help="images decoded together, one backend step for all "
                   "(ort and torch on the CPU; with --ray: per actor; default: 1)")
    ray = p.add_argument_group("Ray (pip install 'rexedge[ray]'; docs/pipelines.md)")
    ray.add_argument("--ray", action="store_true", help="run on a pool of Ray actors, each loading the model")
    ray.add_argument("--address", help="Ray cluster to join: auto (the one `ray start` made here), ray://HOST:10001, "
                     "...; default: a local Ray instance for this run")
    ray.add_argument("--actors", type=int, help="actors, each holding one model (default: 1)")
    ray.add_argument("--gpus-per-actor", type=float, metavar="G",
                     help="GPUs reserved per actor, fractions share one (default: 0; use with --device cuda)")
    p.set_defaults(handler=_batch)

    p = sub.add_parser("bench", help="latency per stage and per token of backends against a baseline (JSON, table, plot)")
    p.add_argument("--model", required=True, help="preset name (random weights made on the fly: tiny, cpu-bench, "
                   "rex-omni-3b), checkpoint directory, or bundle directory (ort only)")
    p.add_argument("--backend", nargs="+", default=["ort"], help="rexedge backends to run (default: ort)")
    p.add_argument("--baseline", choices=["transformers", "llama.cpp"],
                   help="also run the baseline; records get speedup_vs_baseline (llama.cpp: needs --llama-cpp)")
    p.add_argument("--weights", nargs="+", choices=["float", "int8", "int4"], default=["float"],
                   help="ort bundles to run: float (runner ort), int8, int4 (ort-int8, ort-int4); default: float")
    p.add_argument("--llama-cpp", metavar="DIR", help="llama.cpp tools and GGUF files made by "
                   "`bash bench/llama_cpp_setup.sh CHECKPOINT DIR` (bench-only)")
    p.add_argument("--workdir", metavar="DIR", help="keep exported bundles here and reuse them (default: a "
                   "temporary directory)")
    p.add_argument("--scenario", nargs="+", help="named scenarios (det-448, det-448-exact, det-896, det-1428x812, "
                   "point-448, rex-omni-3b, rex-omni-3b-exact) or WxH:N/K[:task][:exact] (N boxes over K "
                   "categories); default: the first five")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per backend and scenario (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default: 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="bundle and baseline precision")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    p.add_argument("--json", metavar="OUT", help="write the JSON document here (schema: bench/README.md)")
    p.add_argument("--plot", metavar="OUT.png", help="write a plot of latency per stage and per token")
    p.set_defaults(handler=_bench)
    return parser


# OpenBLAS's workers yield in a loop for 2^28 cycles (~0.1 s) after each multi-threaded product
# (the full-vocabulary head) before they sleep, taking a core from ONNX Runtime's next step
# (bench/RESULTS.md). 2^4 cycles: they sleep at once; the product itself is no slower. OpenBLAS
# reads it when it loads, so it is set here, before any handler imports numpy; a user's value wins.
OPENBLAS_THREAD_TIMEOUT = "4"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)
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

