"""A backend over a bundle's graphs with the KV cache as plain numpy arrays, for any decoder flavour.

Calibration and the INT8 quality measurement need what the ``ort`` backend hides on
purpose: every decoder call's complete inputs, KV cache included (the calibrator runs
the graph on exactly those), and they must work for every flavour, also the ``trt``
one that the ``ort`` backend refuses. So the decoder runs as an
:class:`~rexedge.runtime.backends.graph_session.ArraySession`: the cache goes in as ``past_*``
arrays and the ``present_*`` outputs become the next call's cache.

Cache conventions per flavour (see :mod:`rexedge.export.onnx.decoder`):
- ``ort``: a fixed-capacity buffer [1, KVH, C, D] plus ``seqlens_k`` (total length - 1)
  and ``total_sequence_length``; C is allocated at prefill for the prompt plus
  ``decode_reserve`` tokens.
- ``trt``: [1, KVH, P, D] in, [1, KVH, P + T, D] out (starts empty).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np

from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.base import (
    BackendError,
    HostHeadBackend,
    check_capacity,
    check_embeds,
    check_image,
    check_positions,
    check_token_ids,
)
from rexedge.runtime.backends.graph_session import ArraySession, Feeds, open_session
from rexedge.runtime.backends.vision_feeds import vision_feeds
from rexedge.runtime.bundle import Bundle, load_bundle
from rexedge.runtime.request.preprocess import PreprocessedImage

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
CACHE_FLAVOURS = ("ort", "trt")


class GraphBackend(HostHeadBackend):
    """The Backend protocol over plain ONNX Runtime runs (CPU); optionally reports every graph's inputs.

    ``on_vision`` / ``on_decoder`` are called with the complete feeds of each vision /
    decoder run, before it runs (the arrays are not modified afterwards, so they may be kept).
    """

    name = "graph"

    def __init__(self, model_path: str | Path | Bundle, threads: int | None = None, decode_reserve: int = 64,
                 on_vision: Callable[[Feeds], None] | None = None,
                 on_decoder: Callable[[Feeds], None] | None = None) -> None:
        bundle = model_path if isinstance(model_path, Bundle) else load_bundle(model_path)
        if bundle.flavour not in CACHE_FLAVOURS:
            raise BackendError(f"{bundle.directory}: decoder flavour {bundle.flavour!r} has no cache convention here "
                               f"(known: {', '.join(CACHE_FLAVOURS)})")
        if decode_reserve < 1:
            raise BackendError(f"decode_reserve must be >= 1, got {decode_reserve}")
        self.bundle = bundle
        self.config = bundle.config
        self._vision, decoder = (open_session(bundle.path(spec.file), threads, bundle.precision, who=self.name)
                                 for spec in (bundle.vision, bundle.decoder))
        kv_input = next(i for i in bundle.decoder.inputs if i["name"] == schema.past("key", 0))
        self._decoder = ArraySession(decoder, self.config, bundle.flavour, _NP_DTYPES[kv_input["dtype"]], on_decoder)
        self.tokenizer = bundle.load_tokenizer()
        self.embed_table = bundle.load_embed_table()
        self.decode_reserve = decode_reserve
        self.max_context = self.config.max_position_embeddings
        self.on_vision = on_vision

    @property
    def _length(self) -> int:
        return self._decoder.length

    def with_hooks(self, decode_reserve: int | None = None,
                   on_decoder: Callable[[Feeds], None] | None = None) -> GraphBackend:
        """A backend on this one's sessions (the weights are not loaded twice) with its own cache, this
        ``decode_reserve`` (default: this one's) and this ``on_decoder``."""
        reserve = self.decode_reserve if decode_reserve is None else decode_reserve
        if reserve < 1:
            raise BackendError(f"decode_reserve must be >= 1, got {reserve}")
        twin = copy.copy(self)
        twin.decode_reserve = reserve
        decoder = self._decoder
        twin._decoder = ArraySession(decoder.session, self.config, decoder.flavour, decoder.kv_dtype, on_decoder)
        return twin

    def encode_image(self, image: PreprocessedImage) -> np.ndarray:
        check_image(self.name, image, self.config)
        feeds = vision_feeds(self.bundle.vision.input_names(), image)
        if self.on_vision:
            self.on_vision(feeds)
        return self._vision.run([schema.IMAGE_EMBEDS], feeds)[0]

    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        check_capacity(self.name, self._length, embeds.shape[0], self.max_context)
        return self._decoder.append(embeds, positions)

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        embeds = check_embeds(self.name, inputs_embeds, self.config.hidden_size)
        positions = check_positions(self.name, position_ids, embeds.shape[0])
        if self.bundle.flavour == "ort":
            # the buffer's capacity is fixed once allocated: the prompt plus the tokens decoding may append
            self.max_context = min(embeds.shape[0] + self.decode_reserve, self.config.max_position_embeddings)
            self._decoder.reset(self.max_context)
        else:
            self._decoder.reset(0)
        return self._run(embeds, positions)

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        token_ids = check_token_ids(self.name, token_ids, self.embed_table.shape[0])
        positions = check_positions(self.name, position_ids, token_ids.size)
        if not self._decoder.started:
            raise BackendError(f"{self.name} backend: step() before prefill()")
        return self._run(np.asarray(self.embed_table[token_ids], dtype=np.float32), positions)
