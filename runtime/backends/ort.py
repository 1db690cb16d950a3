"""The ``ort`` backend: a bundle's vision and decoder graphs on ONNX Runtime.

The decoder runs as an :class:`~rexedge.runtime.backends.graph_session.InPlaceSession`: one
max-length KV buffer per layer and kind (``[1, kv_heads, max_context, head_dim]``) bound with
IOBinding as both ``past_*`` and ``present_*``, written in place by GroupQueryAttention, so a step
never copies the cache; single-token steps run through buffers bound once. With ``max_batch`` > 1
it is a :class:`~rexedge.runtime.backends.graph_session.SlotSession` instead (``max_batch`` slots of
``max_context + MAX_STEP_TOKENS``, the batched step's padding room), stepping several sequences per
call; the bundle's manifest must allow that batch (bundles exported before batching allow 1).

Devices: ``cpu`` (default) or ``cuda`` / ``cuda:N``, which needs the CUDA execution
provider of ``onnxruntime-gpu``; without it that is an error, never a silent CPU fallback.
Importing this module imports onnxruntime and numpy only (no torch).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.base import (
    DEFAULT_MAX_CONTEXT,
    MAX_STEP_TOKENS,
    BackendError,
    HostHeadBackend,
    allocate_slots,
    check_batch_step,
    check_capacity,
    check_embeds,
    check_image,
    check_max_batch,
    check_positions,
    check_slot,
    check_token_ids,
)
from rexedge.runtime.backends.graph_session import (
    CPU,
    HeadSession,
    InPlaceSession,
    SlotSession,
    open_session,
)
from rexedge.runtime.backends.prepacked import HEAD_GRAPH, prepacked_graphs
from rexedge.runtime.backends.vision_feeds import vision_feeds
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.decode.head import NumpyHead, Sampling

if TYPE_CHECKING:
    from rexedge.runtime.request.preprocess import PreprocessedImage

# ONNX Runtime's CPU provider has no fp16 matrix kernels on x86: it up-casts an fp16 graph's weights to
# float32 copies when the session is made (so RSS is the fp32 bundle's, twice the fp16 size) and runs in fp32
# with casts around (slower than an fp32 bundle); measured at the 3B shapes in bench/RESULTS.md (issue 18 item 3)
FP16_ON_CPU = ("rexedge: an fp16 bundle is for GPUs; on a CPU, ONNX Runtime holds float32 copies of its weights "
               "(twice its size in memory, and slower than fp32): export with --weights int4 or int8 (or --dtype fp32)")

_KV_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.float32}  # int8: Q/DQ graphs, float32 cache


def _providers(device: str) -> tuple[list, str, int]:
    """ONNX Runtime providers for ``device``, the OrtValue device type and id."""
    if device == "cpu":
        return ["CPUExecutionProvider"], "cpu", 0
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise BackendError(f"ort backend: unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    device_id = int(index or 0)
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise BackendError(
            f"ort backend: device {device!r} needs the CUDA execution provider, which this onnxruntime lacks "
            f"(it has {', '.join(available)}); pip install onnxruntime-gpu in place of onnxruntime")
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"], "cuda", device_id


class OrtBackend(HostHeadBackend):
    """Runs a bundle (``rexedge export`` output) on ONNX Runtime."""

    name = "ort"

    def __init__(self, model_path: str | Path, device: str = "cpu", max_context: int = DEFAULT_MAX_CONTEXT,
                 threads: int | None = None, verify_hashes: bool = True, max_batch: int = 1) -> None:
        providers, device_type, device_id = _providers(device)
        check_max_batch(self.name, max_batch)
        bundle = load_bundle(model_path, verify_hashes=verify_hashes)
        if bundle.flavour != "ort":
            raise BackendError(f"ort backend: {bundle.directory} holds a {bundle.flavour!r} decoder graph; "
                               f"export with --flavour ort")
        bundle_batch = bundle.decoder.dims.get(schema.BATCH_DIM, (1, 1))[1]
        if max_batch > bundle_batch:
            raise BackendError(f"ort backend: max_batch={max_batch}, but the bundle {bundle.directory} allows a "
                               f"decoder batch of at most {bundle_batch} (exported before batched decoding?); "
                               f"re-export it with this rexedge (rexedge export) or use max_batch <= {bundle_batch}")
        cfg = bundle.config
        if device == "cpu" and bundle.precision == "fp16":
            logging.getLogger("rexedge").warning(FP16_ON_CPU)
        if not 1 <= max_context <= cfg.max_position_embeddings:
            raise BackendError(f"ort backend: max_context must be in 1..{cfg.max_position_embeddings}, "
                               f"got {max_context}")
        # this CPU's prepacked graphs (rexedge prepack) load without prepacking and optimizing again
        self.prepacked = prepacked_graphs(bundle) if device == "cpu" else {}

        def graph(name: str, file: str, providers: list = providers, device: str = device) -> ort.InferenceSession:
            return open_session(bundle.path(self.prepacked.get(name, file)), threads, bundle.precision, providers,
                                device, optimized=name in self.prepacked)

        # The vision graph's activations change size with every image, and ONNX Runtime's CPU
        # arena keeps the largest ever seen. So the arena serves the blocks within one run and
        # gives its memory back after each run (arena shrinkage). cpu-bench preset, 1,479 image
        # tokens, ort flavour (flash attention), 6 runs each: 0.93 s, peak RSS 411 MB, 193 MB
        # resident afterwards; without an arena 0.97-1.0 s, 550 MB, 250-280 MB; an arena kept
        # 0.86 s, 597 MB, 597 MB (an older dense-attention graph kept 2.9 GB that way).
        self._vision = graph(schema.VISION, bundle.vision.file)
        self._vision_run = ort.RunOptions()
        self._vision_run.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        decoder = graph(schema.DECODER, bundle.decoder.file)
        kv_dtype = _KV_DTYPES[bundle.precision]
        if max_batch == 1:
            self._decoder = InPlaceSession(decoder, cfg, max_context, kv_dtype, device_type, device_id)
        else:
            capacity = max_context + MAX_STEP_TOKENS
            per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * np.dtype(kv_dtype).itemsize
            self._decoder = allocate_slots(
                self.name, lambda: SlotSession(decoder, cfg, max_batch, capacity, kv_dtype, device_type, device_id),
                max_batch, capacity, per_token)
        self.max_batch = max_batch
        # weight-quantized bundles: full-vocabulary head products on the int8 head graph, not the float table
        head = bundle.head_graph
        self._head = None if head is None else HeadSession(
            graph(HEAD_GRAPH, head[schema.FILE], CPU, "cpu"), cfg.hidden_size, cfg.vocab_size)

        self.bundle = bundle
        self.config = cfg
        self.pixels = bundle.pixels
        self.tokenizer = bundle.load_tokenizer()
        self.embed_table = bundle.load_embed_table()
        self.max_context = max_context

    def make_head(self, sampling: Sampling) -> NumpyHead:
        return NumpyHead(self.embed_table, sampling, None if self._head is None else self._head.logits)

    @property
    def _length(self) -> int:
        return self.slot_length(0)

    def slot_length(self, slot: int) -> int:
        if self.max_batch == 1:
            check_slot(self.name, slot, 1)
            return self._decoder.length
        check_slot(self.name, slot, self.max_batch)
        return int(self._decoder.lengths[slot])

    def encode_image(self, image: PreprocessedImage) -> np.ndarray:
        check_image(self.name, image, self.config)
        return self._vision.run([schema.IMAGE_EMBEDS], vision_feeds(self.bundle.vision.input_names(), image),
                                self._vision_run)[0]

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, slot: int = 0) -> np.ndarray:
        embeds = check_embeds(self.name, inputs_embeds, self.config.hidden_size)
        positions = check_positions(self.name, position_ids, embeds.shape[0])
        check_slot(self.name, slot, self.max_batch)
        check_capacity(self.name, 0, embeds.shape[0], self.max_context)
        if self.max_batch > 1:
            return self._decoder.append_slot(slot, embeds, positions, reset=True)
        self._decoder.reset()
        return self._decoder.append(embeds, positions)

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray, slot: int = 0) -> np.ndarray:
        """Append tokens (to ``slot``); for one token the result is a view of the backend's output buffer,
        valid until the next call (copy it to keep it)."""
        token_ids = check_token_ids(self.name, token_ids, self.embed_table.shape[0])
        positions = check_positions(self.name, position_ids, token_ids.size)
        check_slot(self.name, slot, self.max_batch)
        check_capacity(self.name, self.slot_length(slot), token_ids.size, self.max_context)
        if self.max_batch > 1:
            return self._decoder.append_slot(slot, self.embed_table[token_ids], positions)
        return self._decoder.append(self.embed_table[token_ids], positions)

    def copy_slot(self, source: int, target: int) -> None:
        """Slot ``target`` gets a copy of ``source``'s cache (branches that share a prefill)."""
        check_slot(self.name, source, self.max_batch)
        check_slot(self.name, target, self.max_batch)
        if self.max_batch == 1:
            raise BackendError("ort backend: copying a KV slot needs max_batch > 1")
        self._decoder.copy_slot(source, target)

    def step_batch(self, token_ids: np.ndarray, position_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """One step of slots 0..B-1 (see ``BatchBackend.step_batch``); [B, H], a new array."""
        token_ids, positions, counts = check_batch_step(self.name, token_ids, position_ids, counts, self.max_batch,
                                                        self.embed_table.shape[0])
        for slot in np.flatnonzero(counts):
            check_capacity(self.name, self.slot_length(int(slot)), int(counts[slot]), self.max_context)
        return self._decoder.append_rows(self.embed_table[token_ids], positions, counts)
