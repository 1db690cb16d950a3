"""The ``rexedge video`` command: a stream's results to JSONL, optionally drawn into a video.

One JSON line per processed frame, flushed as it is written: ``{"frame", "timestamp",
"latency_s", <the result fields of rexedge batch>, "detections"}``. Files show a progress
bar; live sources a running frames-per-second and latency readout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from rexedge.runtime.pipelines.stream import StreamError, StreamResult, check_video_file, import_cv2, is_video_file
from rexedge.runtime.results.result import Result

# the annotated video's codec by file suffix (both ship with the PyPI OpenCV wheels)
FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}
LIVE_ANNOTATE_FPS = 5.0   # a live stream's results come at the model's pace, not the camera's
READOUT_WINDOW = 30       # frames in the running latency median


def frame_record(r: StreamResult) -> dict[str, Any]:
    return {"frame": r.index, "timestamp": r.timestamp, "latency_s": r.latency, **r.typed.to_json()}


def annotate_frame(frame: np.ndarray, result: Result, channel_order: str) -> np.ndarray:
    """The frame with the result drawn on, in the same channel order."""
    from PIL import Image

    from rexedge.runtime.results.draw import draw_detections

    rgb = frame[..., ::-1] if channel_order == "bgr" else frame
    out = np.asarray(draw_detections(Image.fromarray(np.ascontiguousarray(rgb)), result.drawable))
    return np.ascontiguousarray(out[..., ::-1]) if channel_order == "bgr" else out


class AnnotatedVideo:
    """An OpenCV VideoWriter opened at the first frame (its size is known only then)."""

    def __init__(self, path: str | Path, fps: float) -> None:
        self.path, self.fps = Path(path), fps
        if self.path.suffix.lower() not in FOURCC:
            raise StreamError(f"--annotate: {path}: expected a {' or '.join(FOURCC)} file")
        self._writer: Any = None

    def write(self, frame_bgr: np.ndarray) -> None:
        cv2 = import_cv2()
        if self._writer is None:
            height, width = frame_bgr.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*FOURCC[self.path.suffix.lower()])
            self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (width, height))
            if not self._writer.isOpened():
                raise StreamError(f"--annotate: OpenCV cannot write {self.path}")
        self._writer.write(frame_bgr)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


def check_before_load(source: Any, args: argparse.Namespace) -> tuple[list[str] | None, list[list[float]] | None]:
    """What can be refused without the model (a large one takes seconds to load): the request (its categories
    and boxes are returned), the annotation file's suffix, a video file that does not exist (cameras, URLs and
    pipelines are opened after the load)."""
    from rexedge.runtime.cli import check_request

    categories, boxes = check_request(args)
    if args.annotate and Path(args.annotate).suffix.lower() not in FOURCC:
        raise StreamError(f"--annotate: {args.annotate}: expected a {' or '.join(FOURCC)} file")
    if is_video_file(source):
        check_video_file(source)
    return categories, boxes


def video_command(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from rexedge.runtime.cli import model_from_args

    source: Any = int(args.input) if args.input.isdigit() else args.input
    if args.max_frames is not None and args.max_frames < 1:
        raise StreamError(f"--max-frames: expected at least 1, got {args.max_frames}")
    categories, boxes = check_before_load(source, args)
    model = model_from_args(args)
    stream = model.stream(source, args.task, categories, args.keypoint_type, boxes, live=args.live, every=args.every)
    with stream:
        annotated = None
        if args.annotate:
            fps = args.annotate_fps or (LIVE_ANNOTATE_FPS if stream.live else (stream.source.fps or 30.0) / args.every)
            annotated = AnnotatedVideo(args.annotate, fps)
        count = stream.source.frame_count
        total = None if stream.live or count is None else -(-count // args.every)
        if args.max_frames is not None:
            total = args.max_frames if total is None else min(total, args.max_frames)
        recent: deque[float] = deque(maxlen=READOUT_WINDOW)
        latency_sum = 0.0
        try:
            with open(args.out, "w", encoding="utf-8") as sink, \
                    tqdm(total=total, unit="frame", desc="live" if stream.live else "video") as bar:
                for r in stream:
                    sink.write(json.dumps(frame_record(r)) + "\n")
                    sink.flush()
                    if annotated is not None:
                        annotated.write(annotate_frame(r.frame, r.typed, stream.channel_order))
                    recent.append(r.latency)
                    latency_sum += r.latency
                    bar.update(1)
                    if stream.live:
                        bar.set_postfix(latency_ms=f"{statistics.median(recent) * 1e3:.0f}",
                                        dropped=stream.stats.dropped, refresh=False)
                    if args.max_frames is not None and stream.stats.processed >= args.max_frames:
                        break
        finally:
            if annotated is not None:
                annotated.close()
    stats = stream.stats
    mean = f"{latency_sum / stats.processed * 1e3:.1f} ms" if stats.processed else "-"
    print(f"processed {stats.processed} of {stats.seen} frames (skipped {stats.skipped}, dropped {stats.dropped}), "
          f"mean latency {mean}; wrote {args.out}" + (f" and {args.annotate}" if args.annotate else ""),
          file=sys.stderr)
