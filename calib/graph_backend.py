"""A backend over a bundle's graphs with the KV cache as plain numpy arrays, for any decoder flavour.

Calibration and the INT8 quality measurement need what the ``ort`` backend hides on
purpose: every decoder call's complete inputs, KV cache included (the calibrator runs
the graph on exactly those), and they must work for every flavour, also the ``trt``
one that the ``ort`` backend refuses. So here each call is a plain
``InferenceSession.run``: the cache goes in as ``past_*`` arrays and the ``present_*``
outputs become the next call's cache. That copies the cache every call, which is fine
offline and is why the runtime never does it.

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
import onnxruntime as ort

from rexedge.runtime.backends.base import (
    BackendError,
    HostHeadBackend,
    check_capacity,
    check_embeds,
    check_image,
    check_positions,
    check_token_ids,
)
from rexedge.runtime.backends.ort import DISABLED_OPTIMIZERS
from rexedge.runtime.bundle import Bundle, load_bundle
from rexedge.runtime.request.preprocess import PreprocessedImage

Feeds = dict[str, np.ndarray]
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
CACHE_FLAVOURS = ("ort", "trt")


def vision_feeds(bundle: Bundle, image: PreprocessedImage) -> Feeds:
    """The vision graph's inputs for one image: the patch rows and the layout arrays of the same names."""
    feeds = {"pixel_patches": np.ascontiguousarray(image.pixel_patches, dtype=np.float32)}
    feeds.update({name: getattr(image.layout, name) for name in bundle.vision.input_names() if name != "pixel_patches"})
    return feeds


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
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.bundle = bundle
        self.config = bundle.config
        disabled = DISABLED_OPTIMIZERS.get(bundle.precision, [])
        self._vision, self._decoder = (
            ort.InferenceSession(str(bundle.path(spec.file)), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=disabled)
            for spec in (bundle.vision, bundle.decoder))
        self._outputs = [o.name for o in self._decoder.get_outputs()]
        kv_input = next(i for i in bundle.decoder.inputs if i["name"] == "past_key_0")
        self._kv_dtype = _NP_DTYPES[kv_input["dtype"]]
        self.tokenizer = bundle.load_tokenizer()
        self.embed_table = bundle.load_embed_table()
        self.decode_reserve = decode_reserve
        self.max_context = self.config.max_position_embeddings
        self.on_vision, self.on_decoder = on_vision, on_decoder
        self._cache: Feeds = {}
        self._length = 0

    def with_hooks(self, decode_reserve: int | None = None,
                   on_decoder: Callable[[Feeds], None] | None = None) -> GraphBackend:
        """A backend on this one's sessions (the weights are not loaded twice) with its own cache, this
        ``decode_reserve`` (default: this one's) and this ``on_decoder``."""
        reserve = self.decode_reserve if decode_reserve is None else decode_reserve
        if reserve < 1:
            raise BackendError(f"decode_reserve must be >= 1, got {reserve}")
        twin = copy.copy(self)
        twin.decode_reserve, twin.on_decoder = reserve, on_decoder
        twin._cache, twin._length = {}, 0
        return twin

    def encode_image(self, image: PreprocessedImage) -> np.ndarray:
        check_image(self.name, image, self.config)
        feeds = vision_feeds(self.bundle, image)
        if self.on_vision:
            self.on_vision(feeds)
        return self._vision.run(["image_embeds"], feeds)[0]

    def _empty_cache(self, capacity: int) -> Feeds:
        cfg = self.config
        shape = (1, cfg.num_key_value_heads, capacity, cfg.head_dim)
        return {f"past_{kind}_{i}": np.zeros(shape, self._kv_dtype)
                for i in range(cfg.num_hidden_layers) for kind in ("key", "value")}

    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        tokens = embeds.shape[0]
        check_capacity(self.name, self._length, tokens, self.max_context)
        feeds: Feeds = {"inputs_embeds": np.ascontiguousarray(embeds[None], dtype=np.float32),
                        "position_ids": np.ascontiguousarray(positions[:, None, :], dtype=np.int64), **self._cache}
        if self.bundle.flavour == "ort":
            feeds["seqlens_k"] = np.array([self._length + tokens - 1], np.int32)
            feeds["total_sequence_length"] = np.array(self._length + tokens, np.int32)
        if self.on_decoder:
            self.on_decoder(feeds)
        results = dict(zip(self._outputs, self._decoder.run(self._outputs, feeds)))
        self._cache = {name.replace("present_", "past_"): value for name, value in results.items()
                       if name.startswith("present_")}
        self._length += tokens
        return results["hidden_states"][0, -1]

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        embeds = check_embeds(self.name, inputs_embeds, self.config.hidden_size)
        positions = check_positions(self.name, position_ids, embeds.shape[0])
        tokens = embeds.shape[0]
        if self.bundle.flavour == "ort":
            # the buffer's capacity is fixed once allocated: the prompt plus the tokens decoding may append
            self.max_context = min(tokens + self.decode_reserve, self.config.max_position_embeddings)
            self._cache = self._empty_cache(self.max_context)
        else:
            self._cache = self._empty_cache(0)
        self._length = 0
        return self._run(embeds, positions)

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        token_ids = check_token_ids(self.name, token_ids, self.embed_table.shape[0])
        positions = check_positions(self.name, position_ids, token_ids.size)
        if not self._cache:
            raise BackendError(f"{self.name} backend: step() before prefill()")
        return self._run(np.asarray(self.embed_table[token_ids], dtype=np.float32), positions)
