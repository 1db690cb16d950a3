"""Several live sources decoded together (``RexOmni.streams``): multi-camera robots.

    model = RexOmni("bundle", max_batch=2)
    with model.streams([0, 1], categories=["cup", "door handle"]) as frames:   # cameras 0 and 1
        for r in frames:
            print(r.source, r.index, r.latency, r.detections)

Each source is a ``FrameStream`` of its own (``rexedge.runtime.pipelines.stream``: reader and preparer
threads, latest frame wins for a live source). The model works in rounds: a round takes the newest
prepared frame of every source still running and decodes them together (``RexOmni.run_many``, up to
``max_batch`` at a time), then yields their results in source order. A source that ends leaves the
rounds; the stream ends with the last. An error of a source (a bad frame, a failed read) or of a
frame's decoding is raised after the results before it, and closes every source.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from rexedge.runtime.pipelines.stream import FrameStream, StreamError, StreamResult, StreamStats, _Closed

if TYPE_CHECKING:
    from rexedge.runtime.api import RexOmni


class MultiStream:
    """An iterable of ``StreamResult`` (``source``: the index of the source) over several frame streams."""

    def __init__(self, model: RexOmni, streams: list[FrameStream]) -> None:
        if not streams:
            raise StreamError("streams: expected at least one source, got none")
        self.model, self.streams = model, streams
        self._started = False

    @property
    def stats(self) -> list[StreamStats]:
        """Each source's frame counts."""
        return [stream.stats for stream in self.streams]

    def __enter__(self) -> MultiStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[StreamResult]:
        if self._started:
            raise StreamError("a stream can be iterated once; open a new one")
        self._started = True
        return self._results()

    def _results(self) -> Iterator[StreamResult]:
        for stream in self.streams:
            stream._begin()
        running = list(range(len(self.streams)))
        try:
            while running:
                frames = {}
                for source in list(running):
                    try:
                        frames[source] = self.streams[source]._take()
                    except _Closed:
                        running.remove(source)
                        self.streams[source]._raise_error()
                outcomes = dict(self.model.run_many((source, prepared) for source, (_, prepared) in frames.items()))
                for source, (frame, _) in frames.items():
                    outcome = outcomes[source]
                    if isinstance(outcome, Exception):
                        raise outcome
                    yield self.streams[source]._finish(frame, outcome, source)
        finally:
            self.close()

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
