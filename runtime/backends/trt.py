"""The ``trt`` backend: a trt-flavour bundle's TensorRT engines (``rexedge build``) on one CUDA stream.

Engines: the record of this machine's GPU, compute capability, TensorRT version and the
requested precision is looked up in the manifest (:func:`rexedge.export.tensorrt.engine.select_engines`);
an engine built elsewhere is a clear error before TensorRT is asked to deserialize it.

Decoder: one execution context per optimization profile (``prefill``: empty cache;
``decode``: a few tokens after a cache), so switching between prompt and steps never
re-selects a profile. The KV cache is passed in and returned (``past_*`` [1, KVH, P, D]
-> ``present_*`` [1, KVH, P+T, D]), so each layer has two device buffers sized to
``max_context`` (ping-pong): a call reads the current one and writes the other, densely
packed at the start, then they swap. Every input and output lives in a buffer allocated
once; a step copies the token's embedding and positions in (one small host-to-device
copy each), enqueues with ``execute_async_v3`` and copies the last hidden state back.

CUDA graphs: TensorRT allows capturing ``enqueueV3`` only while input shapes and tensor
addresses stay what they were at capture; here the cache length P (an input shape) and
the ping-pong addresses change every token, so a captured step would be invalid at the
next one and the step is enqueued directly. (An in-place cache needs a TensorRT plugin.)

Head: with torch and triton installed, :meth:`make_head` returns the Triton restricted
head (``DeviceHead``, runtime/backends/device_head.py), which reads the last hidden state on the
device, and ``prefill`` / ``step`` return that state as a torch tensor (as the torch CUDA
backend does); otherwise the numpy head over the hidden state copied to the host (8 KB
per token for the 3B model), and they return a numpy array.

Imports: tensorrt and the CUDA memory provider are imported when the backend is created,
never at module import; torch only through the memory provider / Triton head.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.base import (
    DEFAULT_MAX_CONTEXT,
    BackendError,
    check_capacity,
    check_embeds,
    check_image,
    check_max_batch,
    check_positions,
    check_token_ids,
)
from rexedge.runtime.backends.cuda_memory import DeviceBuffer, open_cuda, parse_cuda_device
from rexedge.runtime.backends.trt_engines import EngineError, current_target, import_tensorrt, select_engines
from rexedge.runtime.backends.vision_feeds import vision_feeds
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.decode.head import NumpyHead, Sampling

if TYPE_CHECKING:
    from rexedge.runtime.decode.head import Head
    from rexedge.runtime.request.preprocess import PreprocessedImage

_KV_BYTES = {"fp32": 4, "fp16": 2}


class TrtBackend:
    """Runs a trt-flavour bundle's engines; ``precision`` picks the engines ("fp16" or "int8")."""

    name = "trt"

    def __init__(self, model_path: str | Path, device: str = "cuda", max_context: int = DEFAULT_MAX_CONTEXT,
                 precision: str = "fp16", verify_hashes: bool = True, max_batch: int = 1) -> None:
        # no batched step yet: the trt flavour's Concat cache shares one past length across rows (rows of a
        # batch differ in length), see docs/tensorrt.md
        check_max_batch(self.name, max_batch, 1)
        index = parse_cuda_device(device, "trt backend")
        try:
            trt = import_tensorrt()
        except EngineError as e:
            raise BackendError(f"trt backend: {e}") from None
        bundle = load_bundle(model_path, verify_hashes=verify_hashes)
        if bundle.flavour != "trt":
            raise BackendError(f"trt backend: {bundle.directory} holds a {bundle.flavour!r} decoder graph; export "
                               f"with --flavour trt and build engines with `rexedge build`")
        self.memory = open_cuda(index)
        try:
            record = select_engines(bundle, current_target(trt, self.memory), precision)
        except EngineError as e:
            raise BackendError(f"trt backend: {e}") from None
        cfg = bundle.config
        decode_profile = _profile(bundle, schema.DECODER, "decode")
        longest = decode_profile[schema.past("key", 0)]["max"][2] + 1
        self._chunk = decode_profile[schema.INPUTS_EMBEDS]["max"][1]  # most tokens one decode call takes
        if not 1 <= max_context <= longest:
            raise BackendError(f"trt backend: max_context must be in 1..{longest} (the engines' decode profile), "
                               f"got {max_context}")
        self.bundle, self.config, self.max_context = bundle, cfg, max_context
        self.tokenizer = bundle.load_tokenizer()
        self.embed_table = bundle.load_embed_table()
        self._length = 0

        self._trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._vision_engine = _deserialize(runtime, bundle.path(record[schema.FILES][schema.VISION]))
        self._decoder_engine = _deserialize(runtime, bundle.path(record[schema.FILES][schema.DECODER]))
        self._vision = self._vision_engine.create_execution_context()
        profiles = record[schema.PROFILES][schema.DECODER]
        self._contexts = {}
        for name in ("prefill", "decode"):
            context = self._decoder_engine.create_execution_context()
            context.set_optimization_profile_async(profiles.index(name), self.memory.stream_handle)
            self._contexts[name] = context

        m, hidden = self.memory, cfg.hidden_size
        layers, kv_bytes = cfg.num_hidden_layers, _KV_BYTES.get(bundle.precision, 2)
        per_layer = cfg.num_key_value_heads * max_context * cfg.head_dim * kv_bytes
        # _kv[side][layer] = (keys, values); side 0 / 1 alternate as past and present
        self._kv = [[(m.alloc(per_layer), m.alloc(per_layer)) for _ in range(layers)] for _ in range(2)]
        self._side = 0
        self._embeds = m.alloc(max_context * hidden * 4)
        self._positions = m.alloc(3 * max_context * 8)
        self._hidden = m.alloc(max_context * hidden * 4)
        self._host_embeds = m.pinned((self._chunk, hidden), np.float32)
        self._host_positions = m.pinned((3, self._chunk), np.int64)
        self._host_hidden = m.pinned((hidden,), np.float32)
        # with torch + triton the head reads the last hidden state on the device (H5's DeviceHead): the
        # decoder's last row is copied (device to device, 4 H bytes) into this static tensor instead of the host
        self._device_head = m.provider == "torch" and importlib.util.find_spec("triton") is not None
        self._last_hidden = m.alloc(hidden * 4).owner.view(m.torch.float32) if self._device_head else None
        self._device_table = None
        self._vision_buffers: dict[str, DeviceBuffer] = {}
        vision_profile = _profile(bundle, schema.VISION, "image")
        for spec in list(bundle.vision.inputs) + list(bundle.vision.outputs):
            shape = vision_profile[spec["name"]]["max"] if spec["name"] in vision_profile else None
            if shape is None:  # the output: image tokens x hidden
                shape = [vision_profile["reverse_index"]["max"][0], hidden]
            self._vision_buffers[spec["name"]] = m.alloc(int(np.prod(shape)) * np.dtype(spec["dtype"]).itemsize)

    # interface ----------------------------------------------------------------------
    @property
    def cache_length(self) -> int:
        return self._length

    def make_head(self, sampling: Sampling) -> "Head":
        """The Triton head on the device when torch and triton are installed, else the numpy head on the host.

        The device head holds the tied embedding on the GPU in fp16 (0.62 GB for the 3B model),
        uploaded once per backend."""
        if not self._device_head:
            return NumpyHead(self.embed_table, sampling)
        from rexedge.runtime.backends.device_head import DeviceHead

        torch = self.memory.torch
        if self._device_table is None:
            self._device_table = torch.from_numpy(np.asarray(self.embed_table)).to(self.memory.device, torch.float16)
        return DeviceHead(self._device_table, self._last_hidden, sampling)

    def encode_image(self, image: "PreprocessedImage") -> np.ndarray:
        check_image(self.name, image, self.config)
        feeds = vision_feeds(self.bundle.vision.input_names(), image)
        context, buffers = self._vision, self._vision_buffers
        for name, array in feeds.items():
            if array.nbytes > buffers[name].nbytes:
                raise BackendError(f"trt backend: image input {name} {array.shape} exceeds the vision engine's "
                                   f"profile")
            context.set_input_shape(name, array.shape)
            context.set_tensor_address(name, buffers[name].ptr)
            self.memory.to_device(buffers[name], array)
        out = np.empty((image.layout.reverse_index.shape[0], self.config.hidden_size), np.float32)
        context.set_tensor_address(schema.IMAGE_EMBEDS, buffers[schema.IMAGE_EMBEDS].ptr)
        self._execute(context, schema.VISION)
        self.memory.to_host(out, buffers[schema.IMAGE_EMBEDS])
        self.memory.synchronize()
        return out

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> Any:
        embeds = check_embeds(self.name, inputs_embeds, self.config.hidden_size)
        positions = check_positions(self.name, position_ids, embeds.shape[0])
        check_capacity(self.name, 0, embeds.shape[0], self.max_context)
        self._length = 0
        self.memory.to_device(self._embeds, np.ascontiguousarray(embeds, dtype=np.float32))
        self.memory.to_device(self._positions, np.ascontiguousarray(positions, dtype=np.int64))
        return self._run("prefill", embeds.shape[0])

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> Any:
        """Append tokens (at most the decode profile's token count per engine call; longer appends run in chunks).

        The result is the backend's pinned output buffer, valid until the next call (copy it to keep it)."""
        token_ids = check_token_ids(self.name, token_ids, self.embed_table.shape[0])
        positions = check_positions(self.name, position_ids, token_ids.size)
        check_capacity(self.name, self._length, token_ids.size, self.max_context)
        for start in range(0, token_ids.size, self._chunk):
            chunk = token_ids[start:start + self._chunk]
            k = chunk.size
            self._host_embeds[:k] = self.embed_table[chunk]
            self._host_positions[:, :k] = positions[:, start:start + k]
            self.memory.to_device(self._embeds, self._host_embeds[:k])
            self.memory.to_device(self._positions, np.ascontiguousarray(self._host_positions[:, :k]))
            hidden = self._run("decode", k)
        return hidden

    # internals ------------------------------------------------------------------------
    def _run(self, profile: str, tokens: int) -> Any:
        """Enqueue one decoder call over the current cache side; swap sides; return the last hidden state."""
        cfg, context = self.config, self._contexts[profile]
        past, present = self._kv[self._side], self._kv[1 - self._side]
        context.set_input_shape(schema.INPUTS_EMBEDS, (1, tokens, cfg.hidden_size))
        context.set_input_shape(schema.POSITION_IDS, (3, 1, tokens))
        context.set_tensor_address(schema.INPUTS_EMBEDS, self._embeds.ptr)
        context.set_tensor_address(schema.POSITION_IDS, self._positions.ptr)
        context.set_tensor_address(schema.HIDDEN_STATES, self._hidden.ptr)
        past_shape = (1, cfg.num_key_value_heads, self._length, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            for j, kind in enumerate(schema.KV_KINDS):
                context.set_input_shape(schema.past(kind, i), past_shape)
                context.set_tensor_address(schema.past(kind, i), past[i][j].ptr)
                context.set_tensor_address(schema.present(kind, i), present[i][j].ptr)
        self._execute(context, schema.DECODER)
        last = (tokens - 1) * cfg.hidden_size * 4
        if self._device_head:
            with self.memory.torch.cuda.stream(self.memory.stream):
                self._last_hidden.copy_(self._hidden.owner[last:last + cfg.hidden_size * 4].view(self._last_hidden.dtype))
        else:
            self.memory.to_host(self._host_hidden, self._hidden, offset=last)
        self.memory.synchronize()
        self._side = 1 - self._side
        self._length += tokens
        return self._last_hidden if self._device_head else self._host_hidden

    def _execute(self, context: Any, what: str) -> None:
        if not context.execute_async_v3(self.memory.stream_handle):
            raise BackendError(f"trt backend: TensorRT could not enqueue the {what} engine (see its log)")


def _deserialize(runtime: Any, path: Path) -> Any:
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BackendError(f"trt backend: TensorRT could not deserialize {path} (see its log); rebuild it with "
                           f"`rexedge build`")
    return engine


def _profile(bundle: Any, graph: str, name: str) -> dict[str, Any]:
    for profile in bundle.manifest[schema.GRAPHS][graph].get(schema.PROFILES, []):
        if profile["name"] == name:
            return profile["shapes"]
    raise BackendError(f"trt backend: {bundle.directory}: the {graph} graph has no {name!r} optimization profile; "
                       f"re-export it with --flavour trt")
