"""The decoder-graph sessions (IOBinding ping-pong, plain arrays, in place) against the compact model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rexedge.export.bundle import export_bundle
from rexedge.runtime.backends.graph_session import ArraySession, InPlaceSession, PingPongSession, open_session
from rexedge.runtime.model.checkpoint import load_model
from rexedge.runtime.model.compact import KVCache

RTOL = 1e-4


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sessions")
    return {f: export_bundle(tiny_checkpoint, root / f, flavour=f, progress=False) for f in ("ort", "trt")}


@pytest.mark.parametrize("flavour,kind", [("trt", "pingpong"), ("trt", "arrays"), ("ort", "arrays"),
                                          ("ort", "in place")])
def test_session_appends_like_the_compact_model(tiny_checkpoint: Path, bundles: dict, flavour: str,
                                                kind: str) -> None:
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    cfg = model.config
    session = open_session(bundles[flavour] / "decoder.onnx", who="test")
    capacity = 53
    runner = {"pingpong": lambda: PingPongSession(session, cfg, capacity),
              "arrays": lambda: ArraySession(session, cfg, flavour, np.float32),
              "in place": lambda: InPlaceSession(session, cfg, capacity)}[kind]()
    rng = np.random.default_rng()   # fresh inputs every run
    for prompt in (19, 11):          # a second prompt after reset: the cache starts over
        cache = KVCache.allocate(cfg, 1, capacity)
        if kind == "arrays":
            runner.reset(capacity if flavour == "ort" else 0)   # the ort flavour's buffer is fixed, trt's grows
        else:
            runner.reset()
        start = 0
        for tokens in (prompt, 1, 3, 1, 2):
            embeds = rng.standard_normal((tokens, cfg.hidden_size), np.float32) * 0.05
            positions = np.tile(np.arange(start, start + tokens) + int(rng.integers(0, 5)), (3, 1))
            hidden = np.array(runner.append(embeds, positions))
            with torch.no_grad():
                want = model.decode(torch.from_numpy(embeds[None]), torch.from_numpy(positions[:, None, :]), cache,
                                    torch.arange(start, start + tokens), kv_length=start + tokens)[0, -1].numpy()
            assert np.abs(hidden - want).max() <= RTOL * np.abs(want).max()
            start += tokens
            assert runner.length == start
