"""Video streams: frames in, timestamped detections out (``RexOmni.stream``).

    model = RexOmni("bundle")
    with model.stream(0, categories=["cup", "door handle"]) as frames:   # camera 0, live
        for r in frames:
            print(r.index, r.timestamp, r.latency, r.detections)

Sources (``open_source``):
- a video file path: read in order, every frame or every ``every``-th one;
- a camera index (int), a URL (``rtsp://...``, ``http://...``) or a GStreamer pipeline
  string (one containing ``!``): live, read through OpenCV (``pip install rexedge[video]``);
- any iterable of HxWx3 uint8 numpy frames (a generator, a list, an NxHxWx3 array): in
  order unless ``live=True`` (e.g. a generator fed by a camera callback).
Channel order: OpenCV delivers BGR, so OpenCV sources are BGR; frames from an iterable
are RGB unless ``channel_order="bgr"`` (pass that for frames you read with OpenCV yourself).

Pipeline: a reader thread, a preparer thread (``RexOmni.prepare``: resize, normalize,
prompt, grammar) and the consumer's thread, which runs the model (``RexOmni.run``) and
yields. They hand frames over through one-item slots, so at most a few frames are held
whatever the stream's length:
- in order (files, iterables): a slot's ``put`` waits until the frame is taken. The
  next frame is prepared while the current one decodes.
- live: a newer frame replaces one not yet taken (latest frame wins) and is counted as
  dropped, so latency never builds up. The preparer keeps the newest frame prepared
  while the model decodes; with ``prepare_ahead=False`` the newest frame is prepared
  only once the model is free (fewer frames preprocessed, each result one preprocessing
  time older).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.results.detections import Item
from rexedge.runtime.results.result import Result

if TYPE_CHECKING:
    from rexedge.runtime.api import PreparedRequest, RexOmni

VIDEO_EXTRA = "pip install rexedge[video]"
# how long close() waits for a pipeline thread; a user iterable blocked in next() may never return
_JOIN_TIMEOUT_S = 5.0


class StreamError(RexEdgeError):
    """A video source that cannot be opened or read, or stream options that do not fit it."""


@dataclass(frozen=True, eq=False)
class Frame:
    """One frame as read from its source."""

    index: int            # position in the source, counting every frame (skipped and dropped ones too)
    timestamp: float      # seconds: media time for video files, since the stream started otherwise
    image: np.ndarray     # HxWx3 uint8, in the source's channel order
    read_at: float        # time.perf_counter() when it was read: where latency starts


@dataclass(frozen=True, eq=False)
class StreamResult:
    """What the stream yields per processed frame."""

    index: int
    timestamp: float
    latency: float        # seconds from the frame being read to its result (waiting included)
    typed: Result         # the frame's result (``result`` is its dictionary)
    frame: np.ndarray     # the frame, in the source's channel order (``FrameStream.channel_order``)
    source: int = 0       # which source (``RexOmni.streams``: its index in the list)

    @property
    def detections(self) -> list[Item]:
        return self.typed.detections

    @property
    def result(self) -> dict[str, Any]:
        """The full ``RexOmni.inference`` dictionary."""
        return self.typed.to_official()


@dataclass
class StreamStats:
    """Frame counts; once a stream has ended, seen == skipped + dropped + processed."""

    seen: int = 0         # frames the source produced
    skipped: int = 0      # left out by ``every``
    dropped: int = 0      # replaced by a newer frame before the model got to them (live sources)
    processed: int = 0    # results yielded


class FrameSource(Protocol):
    live: bool
    channel_order: str
    fps: float | None     # nominal frame rate, when the source knows one
    frame_count: int | None

    def read(self, stats: StreamStats) -> Frame | None:
        """The next frame to use (None at the end); counts what it skips in ``stats``."""

    def close(self) -> None: ...


def import_cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise StreamError(f"video files, cameras and URLs are read with OpenCV: {VIDEO_EXTRA}") from None
    return cv2


def open_source(source: Any, live: bool | None = None, every: int = 1,
                channel_order: str | None = None) -> FrameSource:
    """A frame source for ``source`` (see the module docstring).

    live: None decides by kind (cameras, URLs and pipelines are live; files and iterables
    are not). every: use every N-th frame of an in-order source. channel_order: of the
    frames of an iterable ("rgb" by default, or "bgr"); OpenCV sources are always BGR.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise StreamError(f"every: expected an int >= 1, got {every!r}")
    if channel_order not in (None, "rgb", "bgr"):
        raise StreamError(f"channel_order: expected 'rgb' or 'bgr', got {channel_order!r}")
    if isinstance(source, (str, os.PathLike, int)) and not isinstance(source, bool):
        if channel_order == "rgb":
            raise StreamError("channel_order: OpenCV sources deliver BGR frames; leave channel_order unset")
        capture, kind = _open_capture(source)
        live = kind != "file" if live is None else live
        source_obj: FrameSource = CaptureSource(capture, live, every)
    elif isinstance(source, np.ndarray) and source.ndim != 4:
        raise StreamError(f"source: a numpy array must hold frames as NxHxWx3, got shape {source.shape} "
                          "(for one image call inference)")
    elif isinstance(source, Iterable):
        source_obj = IterableSource(iter(source), bool(live), every, channel_order or "rgb")
    else:
        raise StreamError(f"source: expected a video file, camera index, URL, GStreamer pipeline or an iterable "
                          f"of frames, got {type(source).__name__}")
    if source_obj.live and every != 1:
        source_obj.close()
        raise StreamError("every: applies to sources read in order; a live source drops stale frames by itself")
    return source_obj


def is_video_file(source: Any) -> bool:
    """Whether an OpenCV source names a file (not a camera index, URL or GStreamer pipeline)."""
    if isinstance(source, int):
        return False
    text = os.fspath(source)
    return "!" not in text and "://" not in text


def check_video_file(text: str) -> None:
    """A video file's path must name an existing file (checked before opening, and before a model loads)."""
    path = Path(text)
    if not path.exists():
        raise StreamError(f"{text}: no such video file (for a camera pass its index as an int)")
    if path.is_dir():
        raise StreamError(f"{text}: is a directory, expected a video file")


def _open_capture(source: str | os.PathLike | int) -> tuple[Any, str]:
    cv2 = import_cv2()
    if isinstance(source, int):
        capture, kind, what = cv2.VideoCapture(source), "camera", f"camera {source}"
    else:
        text = os.fspath(source)
        if "!" in text:
            if not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
                raise StreamError(f"{text!r} looks like a GStreamer pipeline, but this OpenCV build has no GStreamer "
                                  "support (the PyPI wheels have none; use an OpenCV built with it, e.g. JetPack's)")
            capture, kind = cv2.VideoCapture(text, cv2.CAP_GSTREAMER), "pipeline"
        elif "://" in text:
            capture, kind = cv2.VideoCapture(text), "url"
        else:
            check_video_file(text)
            capture, kind = cv2.VideoCapture(text), "file"
        what = text
    if not capture.isOpened():
        capture.release()
        why = {"camera": "no such camera, or it is in use", "file": "not a video, or a codec OpenCV lacks",
               "url": "unreachable, or a stream OpenCV cannot read", "pipeline": "the pipeline failed to start"}[kind]
        raise StreamError(f"{what}: OpenCV cannot open this {kind} ({why})")
    return capture, kind


class CaptureSource:
    """Frames from an OpenCV ``VideoCapture`` (BGR)."""

    channel_order = "bgr"

    def __init__(self, capture: Any, live: bool, every: int) -> None:
        cv2 = import_cv2()
        self._capture, self.live, self._every = capture, live, every
        self._pos_msec = cv2.CAP_PROP_POS_MSEC
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and fps > 0 else None
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if not live else 0
        self.frame_count = count if count > 0 else None
        self._next_index = 0
        self._start = time.perf_counter()

    def read(self, stats: StreamStats) -> Frame | None:
        # skipped frames are only grabbed: no conversion to BGR for frames nobody looks at
        while self._next_index % self._every != 0:
            if not self._capture.grab():
                return None
            stats.seen += 1
            stats.skipped += 1
            self._next_index += 1
        ok, image = self._capture.read()
        if not ok:
            return None
        now = time.perf_counter()
        stats.seen += 1
        index, self._next_index = self._next_index, self._next_index + 1
        # a file's frames carry their media time; a live source's clock is the reader's
        timestamp = self._capture.get(self._pos_msec) / 1000.0 if not self.live else now - self._start
        return Frame(index, timestamp, image, now)

    def close(self) -> None:
        self._capture.release()


class IterableSource:
    """Frames from any iterable of numpy arrays."""

    fps = None
    frame_count = None

    def __init__(self, frames: Iterator[Any], live: bool, every: int, channel_order: str) -> None:
        self._frames, self.live, self._every, self.channel_order = frames, live, every, channel_order
        self._next_index = 0
        self._start = time.perf_counter()

    def read(self, stats: StreamStats) -> Frame | None:
        for image in self._frames:
            index, self._next_index = self._next_index, self._next_index + 1
            stats.seen += 1
            if index % self._every != 0:
                stats.skipped += 1
                continue
            now = time.perf_counter()
            return Frame(index, now - self._start, image, now)
        return None

    def close(self) -> None:
        close = getattr(self._frames, "close", None)  # a generator's cleanup (its finally blocks) runs now
        if close is not None:
            close()


class _Closed(Exception):
    """Raised by ``Slot.get`` once the slot is closed and empty."""


_EMPTY = object()


class Slot:
    """A one-item hand-off between two threads.

    latest=False: ``put`` waits until the previous item has been taken (in-order sources).
    latest=True: ``put`` replaces an item not yet taken and counts it in ``dropped``.
    ``close`` wakes both sides: ``put`` then returns False, ``get`` hands out a remaining
    item and then raises ``_Closed``.
    """

    def __init__(self, latest: bool) -> None:
        self._latest = latest
        self._cond = threading.Condition()
        self._item: Any = _EMPTY
        self._closed = False
        self.dropped = 0

    def put(self, item: Any) -> bool:
        with self._cond:
            if not self._latest:
                self._cond.wait_for(lambda: self._item is _EMPTY or self._closed)
            if self._closed:
                return False
            if self._item is not _EMPTY:
                self.dropped += 1
            self._item = item
            self._cond.notify_all()
            return True

    def get(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._item is not _EMPTY or self._closed)
            if self._item is _EMPTY:
                raise _Closed
            item, self._item = self._item, _EMPTY
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class FrameStream:
    """An iterable of ``StreamResult``, one per processed frame; iterate it once.

    Closing (``close()``, leaving a ``with`` block, or breaking out of the loop) stops the
    threads and releases the source. ``stats`` counts frames seen, skipped, dropped and
    processed. An error in the reader or preparer (a bad frame, a failed read) is raised
    in the consuming thread after the frames before it.
    """

    def __init__(self, model: RexOmni, source: FrameSource, request: dict[str, Any],
                 prepare_ahead: bool = True) -> None:
        self.model, self.source, self.request = model, source, request
        self.prepare_ahead = prepare_ahead
        self._counts = StreamStats()   # seen / skipped by the reader, processed by the consumer
        self._frames = Slot(latest=source.live)
        self._ready = Slot(latest=source.live) if prepare_ahead else None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._started = False
        self._reading = False
        self._closed = False

    @property
    def stats(self) -> StreamStats:
        """A snapshot of the frame counts (exact once the stream has ended)."""
        dropped = self._frames.dropped + (self._ready.dropped if self._ready is not None else 0)
        return replace(self._counts, dropped=dropped)

    @property
    def live(self) -> bool:
        return self.source.live

    @property
    def channel_order(self) -> str:
        return self.source.channel_order

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[StreamResult]:
        if self._started:
            raise StreamError("a stream can be iterated once; open a new one")
        self._started = True
        return self._results()

    def _results(self) -> Iterator[StreamResult]:
        if self._closed:
            return
        self._begin()
        try:
            while True:
                try:
                    frame, prepared = self._take()
                except _Closed:
                    break
                yield self._finish(frame, self.model.run(prepared))
            self._raise_error()
        finally:
            self.close()

    def _begin(self) -> None:
        """Start the reader (and preparer) threads."""
        self._reading = True
        self._start_thread(self._read_loop, "rexedge-stream-reader")
        if self._ready is not None:
            self._start_thread(self._prepare_loop, "rexedge-stream-preparer")

    def _take(self) -> tuple[Frame, PreparedRequest]:
        """The next prepared frame (the newest, for a live source); ``_Closed`` once the stream has ended."""
        return self._ready.get() if self._ready is not None else self._prepare_next()

    def _finish(self, frame: Frame, official: dict[str, Any], source: int = 0) -> StreamResult:
        """The frame's result, counted as processed."""
        latency = time.perf_counter() - frame.read_at
        self._counts.processed += 1
        return StreamResult(frame.index, frame.timestamp, latency, Result.from_official(official), frame.image, source)

    def _raise_error(self) -> None:
        """The reader's or preparer's error, if one stopped the stream."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._frames.close()
        if self._ready is not None:
            self._ready.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(_JOIN_TIMEOUT_S)
        if not self._reading:
            self.source.close()  # no reader thread owns the source

    def _start_thread(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _prepare(self, frame: Frame) -> PreparedRequest:
        return self.model.prepare(frame.image, channel_order=self.source.channel_order, **self.request)

    def _prepare_next(self) -> tuple[Frame, PreparedRequest]:
        frame = self._frames.get()
        return frame, self._prepare(frame)

    def _read_loop(self) -> None:
        # the reader owns the source: it alone reads it, and releases it when it stops
        try:
            while not self._stop.is_set():
                frame = self.source.read(self._counts)
                if frame is None or not self._frames.put(frame):
                    break
        except BaseException as e:  # handed to the consumer, which raises it
            self._error = self._error or e
        finally:
            self._frames.close()
            self.source.close()

    def _prepare_loop(self) -> None:
        assert self._ready is not None
        try:
            while not self._stop.is_set():
                frame = self._frames.get()
                if not self._ready.put((frame, self._prepare(frame))):
                    break
        except _Closed:
            pass
        except BaseException as e:
            self._error = self._error or e
            self._frames.close()  # the reader stops too
        finally:
            self._ready.close()
