"""RexOmni.stream and `rexedge video` on a tiny bundle: every streamed result equals a plain
``inference`` call on the same frame; live sources drop stale frames instead of queueing them."""

from __future__ import annotations

import json
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest

from rexedge.export.bundle import export_bundle
from rexedge.runtime.api import RexOmni
from rexedge.runtime.cli import main
from rexedge.runtime.request.preprocess import ImageError
from rexedge.runtime.pipelines.stream import StreamError

cv2 = pytest.importorskip("cv2", reason="the video tests need OpenCV (pip install rexedge[video])")

FPS = 10
CATEGORIES = ["cup", "dog"]
# enough for the random model to finish a phrase (the grammar closes it after 256 ids) and write boxes
MAX_TOKENS = 400


@pytest.fixture(scope="module")
def bundle_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("stream") / "bundle", progress=False)


@pytest.fixture
def model(bundle_dir: Path) -> RexOmni:
    return RexOmni(bundle_dir, max_tokens=MAX_TOKENS)


def random_frames(n: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def frame_with_detections(model: RexOmni, height: int, width: int) -> np.ndarray:
    """A random BGR frame on which the random tiny model writes at least one box (most get none)."""
    for seed in range(100, 200):
        [frame] = random_frames(1, height, width, seed)
        if model.inference(frame, categories=CATEGORIES, channel_order="bgr")[0]["detections"]:
            return frame
    pytest.fail("no random frame made the tiny model write a box")


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    """A lossless (FFV1) video, so the decoded frames are the written ones."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), FPS, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def decoded_frames(path: Path) -> list[np.ndarray]:
    """The frames as OpenCV decodes them, read without rexedge."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def assert_same_result(streamed: dict, reference: dict) -> None:
    assert streamed["output_token_ids"] == reference["output_token_ids"]
    assert streamed["detections"] == reference["detections"]
    assert streamed["image_size"] == reference["image_size"]


def test_video_file_every_second_frame_matches_plain_inference(model: RexOmni, bundle_dir: Path,
                                                               tmp_path: Path) -> None:
    written = random_frames(7, 60, 90, seed=7)
    written[4] = frame_with_detections(model, 60, 90)   # a frame every=2 processes
    video = write_video(tmp_path / "clip.avi", written)
    frames = decoded_frames(video)
    assert len(frames) == 7 and all(np.array_equal(a, b) for a, b in zip(frames, written))
    with model.stream(video, categories=CATEGORIES, every=2) as stream:
        results = list(stream)
    assert not stream.live and stream.channel_order == "bgr"
    assert [r.index for r in results] == [0, 2, 4, 6]
    assert [r.timestamp for r in results] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert stream.stats.seen == 7 and stream.stats.skipped == 3
    assert stream.stats.processed == 4 and stream.stats.dropped == 0
    reference = RexOmni(bundle_dir, max_tokens=MAX_TOKENS)
    for r in results:
        np.testing.assert_array_equal(r.frame, frames[r.index])
        [expected] = reference.inference(frames[r.index], categories=CATEGORIES, channel_order="bgr")
        assert_same_result(r.result, expected)
        assert r.detections == expected["detections"]
        assert r.latency > 0
    assert any(r.detections for r in results), "no frame had detections: the comparison checks too little"


@pytest.mark.parametrize("channel_order", ["rgb", "bgr"])
def test_iterable_frames_in_order_with_their_channel_order(model: RexOmni, bundle_dir: Path,
                                                          channel_order: str) -> None:
    frames = random_frames(5, 45, 70, seed=8)
    stream = model.stream(iter(frames), categories=CATEGORIES, channel_order=channel_order)
    results = list(stream)
    assert [r.index for r in results] == list(range(5))
    reference = RexOmni(bundle_dir, max_tokens=MAX_TOKENS)
    for r, frame in zip(results, frames):
        rgb = frame[..., ::-1] if channel_order == "bgr" else frame
        [expected] = reference.inference(np.ascontiguousarray(rgb), categories=CATEGORIES)
        assert_same_result(r.result, expected)
    # a 4-D array is an iterable of frames too
    as_array = list(model.stream(np.stack(frames[:2]), categories=CATEGORIES, channel_order=channel_order))
    assert [r.result["output_token_ids"] for r in as_array] == [r.result["output_token_ids"] for r in results[:2]]


class GatedSource:
    """Frames released in groups of ``gap`` per model step started, with a model step that
    lasts until its whole group has been delivered: while the model works on one frame,
    ``gap`` newer frames arrive. No timing is involved, only the order of events."""

    def __init__(self, n: int, gap: int) -> None:
        self.n, self.gap = n, gap
        self.frames = random_frames(3, 40, 60, seed=1)
        self.cond = threading.Condition()
        self.runs = 0
        self.delivered = 0    # frames handed to the stream's reader (each put before the next is asked for)

    def __iter__(self):
        for k in range(self.n):
            with self.cond:
                self.delivered = k
                self.cond.notify_all()
                assert self.cond.wait_for(lambda: k < (self.runs + 1) * self.gap, timeout=60), "source gate stuck"
            yield self.frames[k % len(self.frames)]
        with self.cond:
            self.delivered = self.n
            self.cond.notify_all()

    def slow(self, run):
        def slow_run(prepared):
            with self.cond:
                self.runs += 1
                target = min(self.n, (self.runs + 1) * self.gap)
                self.cond.notify_all()
                assert self.cond.wait_for(lambda: self.delivered >= target, timeout=60), "slow step stuck"
            return run(prepared)
        return slow_run


@pytest.mark.parametrize("prepare_ahead", [True, False])
def test_live_source_drops_stale_frames_under_a_slow_step(bundle_dir: Path, prepare_ahead: bool) -> None:
    n, gap = 60, 6
    model = RexOmni(bundle_dir, max_tokens=16)
    source = GatedSource(n, gap)
    model.run = source.slow(model.run)
    with model.stream(source, categories=CATEGORIES, live=True, prepare_ahead=prepare_ahead) as stream:
        indices = [r.index for r in stream]
    stats = stream.stats
    assert stats.seen == n and stats.skipped == 0
    assert stats.processed == len(indices) and stats.processed + stats.dropped == n   # nothing unaccounted
    # in order, all 60 frames would queue up; here each step outlives `gap` frames and only the newest survives
    assert (n - 1) // gap <= stats.processed <= n // gap + 3
    assert indices == sorted(set(indices))
    assert indices[-1] == n - 1      # the newest frame is never the one dropped


def test_memory_stays_bounded_over_a_long_stream(bundle_dir: Path) -> None:
    model = RexOmni(bundle_dir, max_tokens=4)
    alive: list[weakref.ref] = []

    def frames():
        for frame in random_frames(1, 30, 40, seed=2) * 150:
            frame = frame.copy()      # a new array per frame, as a decoder makes
            alive.append(weakref.ref(frame))
            yield frame

    most = 0
    for r in model.stream(frames(), categories=CATEGORIES):
        most = max(most, sum(ref() is not None for ref in alive))
    assert r.index == 149
    # reader slot, preparer, ready slot, the model's frame, the generator's and the yielded one
    assert most <= 6


def test_closing_early_stops_the_threads_and_the_source(model: RexOmni) -> None:
    closed = threading.Event()

    def endless():
        try:
            frame = random_frames(1, 30, 40, seed=4)[0]
            while True:
                yield frame
        finally:
            closed.set()

    with model.stream(endless(), categories=CATEGORIES, live=True) as stream:
        for count, _ in enumerate(stream, 1):
            if count == 3:
                break
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name.startswith("rexedge-stream")]
    with pytest.raises(StreamError, match="iterated once"):
        iter(stream)


def test_a_bad_frame_is_raised_after_the_frames_before_it(model: RexOmni) -> None:
    good = random_frames(2, 30, 40, seed=5)
    stream = model.stream(good + [np.zeros((30, 40, 3), np.float32)], categories=CATEGORIES)
    seen = []
    with pytest.raises(ImageError, match="uint8"):
        for r in stream:
            seen.append(r.index)
    assert seen == [0, 1]


def test_bad_sources_and_options_are_clear_errors(model: RexOmni, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    frames = random_frames(2, 30, 40, seed=6)
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video")
    cases = [
        (tmp_path / "missing.mp4", {}, "no such video file"),
        (tmp_path, {}, "is a directory"),
        (not_video, {}, "OpenCV cannot open"),
        (frames, {"every": 0}, "every"),
        (frames, {"every": 2, "live": True}, "live source"),
        (frames[0], {}, "NxHxWx3"),
        (3.5, {}, "expected a video file"),
        (frames, {"channel_order": "rgba"}, "channel_order"),
        (not_video, {"channel_order": "rgb"}, "BGR"),
    ]
    for source, options, message in cases:
        with pytest.raises(StreamError, match=message):
            model.stream(source, categories=CATEGORIES, **options)
    monkeypatch.setitem(sys.modules, "cv2", None)    # as if OpenCV were not installed
    with pytest.raises(StreamError, match=r"pip install rexedge\[video\]"):
        model.stream(not_video, categories=CATEGORIES)


def test_video_command_writes_jsonl_and_an_annotated_video(bundle_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    frames = random_frames(7, 60, 90, seed=0)
    reference = RexOmni(bundle_dir, max_tokens=MAX_TOKENS)
    frames[3] = frame_with_detections(reference, 60, 90)   # a frame --every 3 processes
    video = write_video(tmp_path / "clip.avi", frames)
    out, annotated = tmp_path / "results.jsonl", tmp_path / "annotated.mp4"
    assert main(["video", str(video), "--model", str(bundle_dir), "--categories", "cup,dog", "--out", str(out),
                 "--annotate", str(annotated), "--every", "3", "--max-new-tokens", str(MAX_TOKENS)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in records] == [0, 3, 6]
    assert [r["timestamp"] for r in records] == pytest.approx([0.0, 0.3, 0.6])
    for record in records:
        [expected] = reference.inference(frames[record["frame"]], categories=CATEGORIES, channel_order="bgr")
        assert record["raw_output"] == expected["raw_output"]
        assert [d["bins"] for d in record["detections"]] == [list(d.bins) for d in expected["detections"]]
    assert any(record["detections"] for record in records)
    drawn = decoded_frames(annotated)
    assert len(drawn) == 3 and drawn[0].shape == frames[0].shape
    assert "processed 3 of 7 frames (skipped 4, dropped 0)" in capsys.readouterr().err
    assert main(["video", str(video), "--model", str(bundle_dir), "--categories", "cup", "--out", str(out),
                 "--annotate", str(tmp_path / "x.gif")]) == 2


def test_video_command_live_readout_and_max_frames(bundle_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    video = write_video(tmp_path / "clip.avi", random_frames(7, 60, 90, seed=0))
    out = tmp_path / "live.jsonl"
    assert main(["video", str(video), "--live", "--max-frames", "2", "--model", str(bundle_dir),
                 "--categories", "cup", "--out", str(out), "--max-new-tokens", "8"]) == 0
    frames = [json.loads(line)["frame"] for line in out.read_text().splitlines()]
    # a file read as a live source: the reader outruns the model, so stale frames are dropped
    assert 1 <= len(frames) <= 2 and frames == sorted(frames)
    err = capsys.readouterr().err
    assert "latency_ms=" in err and f"processed {len(frames)} of" in err
