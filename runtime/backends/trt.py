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

Batched decoding (``max_batch`` > 1, a bundle exported with the ``key_valid`` input): the rows share
one cache length, and :class:`rexedge.runtime.backends.trt_slots.SlotCache` keeps each row's holes,
copies a new request's prefill (run as one sequence into the spare side) into its row and compacts
the rows when they reach ``max_context`` + one decode call. Every row in use takes part in each decode
call (the batch of a call covers the cache of every row); a row not stepping appends holes.

The engines are reached through :class:`TrtEngines` (the execution contexts and the memory
provider), which :func:`open_engines` makes from TensorRT; the tests put ONNX Runtime stand-ins behind
the same methods (``TrtBackend.from_engines``) to run this bookkeeping on a CPU.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.base import (
    DEFAULT_MAX_CONTEXT,
    BackendError,
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
from rexedge.runtime.backends.cuda_memory import CudaMemory, DeviceBuffer, open_cuda, parse_cuda_device
from rexedge.runtime.backends.trt_engines import (
    EngineError,
    current_target,
    import_tensorrt,
    record_max_batch,
    select_engines,
)
from rexedge.runtime.backends.trt_slots import SlotCache
from rexedge.runtime.backends.vision_feeds import vision_feeds
from rexedge.runtime.bundle import Bundle, load_bundle
from rexedge.runtime.decode.head import NumpyHead, Sampling

if TYPE_CHECKING:
    from rexedge.runtime.decode.head import Head
    from rexedge.runtime.request.preprocess import PreprocessedImage

_KV_BYTES = {"fp32": 4, "fp16": 2}


@dataclass
class TrtEngines:
    """What the backend runs: the engines' execution contexts (vision; decoder per profile, "prefill" and
    "decode") on one memory provider's stream, and the most rows a decode call takes. TensorRT's
    ``IExecutionContext`` is the context (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``);
    :func:`open_engines` makes them from a bundle's engines. Anything with the same methods runs the backend
    (a CPU stand-in that runs the graphs on ONNX Runtime tests the bookkeeping without a GPU)."""

    memory: CudaMemory
    vision: Any
    decoder: dict[str, Any]
    max_batch: int
    keep: tuple = ()   # what the contexts need alive (the deserialized engines)


def open_engines(bundle: Bundle, device: str, precision: str) -> TrtEngines:
    """The bundle's engines for this machine's GPU and TensorRT, deserialized, one context per profile."""
    index = parse_cuda_device(device, "trt backend")
    try:
        trt = import_tensorrt()
    except EngineError as e:
        raise BackendError(f"trt backend: {e}") from None
    memory = open_cuda(index)
    try:
        record = select_engines(bundle, current_target(trt, memory), precision)
    except EngineError as e:
        raise BackendError(f"trt backend: {e}") from None
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    vision_engine = _deserialize(runtime, bundle.path(record[schema.FILES][schema.VISION]))
    decoder_engine = _deserialize(runtime, bundle.path(record[schema.FILES][schema.DECODER]))
    profiles = record[schema.PROFILES][schema.DECODER]
    contexts = {}
    for name in ("prefill", "decode"):
        context = decoder_engine.create_execution_context()
        context.set_optimization_profile_async(profiles.index(name), memory.stream_handle)
        contexts[name] = context
    return TrtEngines(memory, vision_engine.create_execution_context(), contexts, record_max_batch(record),
                      (runtime, vision_engine, decoder_engine))


class TrtBackend:
    """Runs a trt-flavour bundle's engines; ``precision`` picks the engines ("fp16" or "int8")."""

    name = "trt"

    def __init__(self, model_path: str | Path, device: str = "cuda", max_context: int = DEFAULT_MAX_CONTEXT,
                 precision: str = "fp16", verify_hashes: bool = True, max_batch: int = 1) -> None:
        check_max_batch(self.name, max_batch)
        parse_cuda_device(device, "trt backend")
        bundle = load_bundle(model_path, verify_hashes=verify_hashes)
        _check_bundle(bundle, max_batch)
        self._setup(bundle, open_engines(bundle, device, precision), max_context, max_batch)

    @classmethod
    def from_engines(cls, model_path: str | Path, engines: TrtEngines, max_context: int = DEFAULT_MAX_CONTEXT,
                     max_batch: int = 1) -> "TrtBackend":
        """A backend over engines already opened (or stand-ins with their interface, see :class:`TrtEngines`)."""
        check_max_batch(cls.name, max_batch)
        bundle = load_bundle(model_path)
        _check_bundle(bundle, max_batch)
        backend = cls.__new__(cls)
        backend._setup(bundle, engines, max_context, max_batch)
        return backend

    def _setup(self, bundle: Bundle, engines: TrtEngines, max_context: int, max_batch: int) -> None:
        cfg = bundle.config
        if max_batch > engines.max_batch:
            raise BackendError(f"trt backend: max_batch={max_batch}, but the engines of {bundle.directory} were "
                               f"built for at most {engines.max_batch} row(s) per decode step; rebuild them with "
                               f"this rexedge (rexedge build) or use max_batch <= {engines.max_batch}")
        decode_profile = _profile(bundle, schema.DECODER, "decode")
        past_max = decode_profile[schema.past("key", 0)]["max"][2]
        # the longest sequence: the prompt profile's; a newer bundle's decode profile has room for holes beyond it
        longest = min(_profile(bundle, schema.DECODER, "prefill")[schema.INPUTS_EMBEDS]["max"][1], past_max + 1)
        self._chunk = decode_profile[schema.INPUTS_EMBEDS]["max"][1]  # most tokens one decode call takes
        if not 1 <= max_context <= longest:
            raise BackendError(f"trt backend: max_context must be in 1..{longest} (the engines' profiles), "
                               f"got {max_context}")
        # batched: a row's stride may run one decode call (chunk tokens) past max_context before compaction
        capacity = max_context if max_batch == 1 else max_context + self._chunk
        if capacity - 1 > past_max:
            raise BackendError(f"trt backend: max_batch={max_batch} needs max_context <= {past_max + 1 - self._chunk} "
                               f"with these engines (room for one step's holes), got {max_context}")
        self.bundle, self.config, self.max_context, self.max_batch = bundle, cfg, max_context, max_batch
        self.pixels = bundle.pixels
        self.tokenizer = bundle.load_tokenizer()
        self.embed_table = bundle.load_embed_table()
        self._length = 0
        self._engines = engines
        self.memory = m = engines.memory
        self._vision, self._contexts = engines.vision, engines.decoder
        self._has_key_valid = schema.KEY_VALID in bundle.decoder.input_names()

        hidden, layers, kv_bytes = cfg.hidden_size, cfg.num_hidden_layers, _KV_BYTES.get(bundle.precision, 2)
        rows_in = max_batch * self._chunk   # the most positions of a batched decode call
        self._embeds = m.alloc(max(max_context, rows_in) * hidden * 4)
        self._positions = m.alloc(3 * max(max_context, rows_in) * 8)
        self._hidden = m.alloc(max(max_context, rows_in) * hidden * 4)
        self._key_valid = m.alloc(max_batch * (capacity + self._chunk))
        if max_batch == 1:
            per_layer = cfg.num_key_value_heads * max_context * cfg.head_dim * kv_bytes
            # _kv[side][layer] = (keys, values); side 0 / 1 alternate as past and present
            self._kv = [[(m.alloc(per_layer), m.alloc(per_layer)) for _ in range(layers)] for _ in range(2)]
            self._side = 0
            if self._has_key_valid:   # one sequence has no holes: every key valid, uploaded once
                m.to_device(self._key_valid, np.ones(self._key_valid.nbytes, bool))
        else:
            self._slots = allocate_slots(self.name, lambda: SlotCache(
                m, layers, cfg.num_key_value_heads, cfg.head_dim, kv_bytes, max_batch, capacity),
                max_batch, capacity, 2 * layers * cfg.num_key_value_heads * cfg.head_dim * kv_bytes)
            self._host_key_valid = m.pinned((max_batch * (capacity + self._chunk),), np.bool_)
            self._host_rows_in = m.pinned((rows_in * hidden,), np.float32)
            self._host_rows_positions = m.pinned((3 * rows_in,), np.int64)
            self._prompt_valid = np.ones(max_context, bool)
        self._host_embeds = m.pinned((self._chunk, hidden), np.float32)
        self._host_positions = m.pinned((3, self._chunk), np.int64)
        self._host_hidden = m.pinned((hidden,), np.float32)
        # with torch + triton the head reads the last hidden state on the device (H5's DeviceHead): the
        # decoder's last row is copied (device to device, 4 H bytes) into this static tensor instead of the host
        self._device_head = m.provider == "torch" and importlib.util.find_spec("triton") is not None
        self._last_hidden = m.alloc(hidden * 4).owner.view(m.torch.float32) if self._device_head else None
        # batched: a step's rows (valid until the next step) and each slot's prefill / step result
        self._rows_hidden = self._row_buffer(max_batch) if max_batch > 1 else None
        self._slot_hidden = self._row_buffer(max_batch) if max_batch > 1 else None
        self._device_table = None
        self._vision_buffers: dict[str, DeviceBuffer] = {}
        vision_profile = _profile(bundle, schema.VISION, "image")
        for spec in list(bundle.vision.inputs) + list(bundle.vision.outputs):
            shape = vision_profile[spec["name"]]["max"] if spec["name"] in vision_profile else None
            if shape is None:  # the output: image tokens x hidden
                shape = [vision_profile["reverse_index"]["max"][0], hidden]
            self._vision_buffers[spec["name"]] = m.alloc(int(np.prod(shape)) * np.dtype(spec["dtype"]).itemsize)

    def _row_buffer(self, rows: int) -> Any:
        """[rows, H] float32 for hidden states: on the device for the device head, else pinned host memory."""
        m, hidden = self.memory, self.config.hidden_size
        if self._device_head:
            return m.alloc(rows * hidden * 4).owner.view(m.torch.float32).view(rows, hidden)
        return m.pinned((rows, hidden), np.float32)

    # interface ----------------------------------------------------------------------
    @property
    def cache_length(self) -> int:
        return self.slot_length(0)

    def slot_length(self, slot: int) -> int:
        check_slot(self.name, slot, self.max_batch)
        return self._length if self.max_batch == 1 else int(self._slots.lengths[slot])

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

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, slot: int = 0) -> Any:
        embeds = check_embeds(self.name, inputs_embeds, self.config.hidden_size)
        positions = check_positions(self.name, position_ids, embeds.shape[0])
        check_slot(self.name, slot, self.max_batch)
        check_capacity(self.name, 0, embeds.shape[0], self.max_context)
        self.memory.to_device(self._embeds, np.ascontiguousarray(embeds, dtype=np.float32))
        self.memory.to_device(self._positions, np.ascontiguousarray(positions, dtype=np.int64))
        if self.max_batch > 1:
            return self._prefill_slot(slot, embeds.shape[0])
        self._length = 0
        return self._run("prefill", embeds.shape[0])

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray, slot: int = 0) -> Any:
        """Append tokens (at most the decode profile's token count per engine call; longer appends run in chunks).

        The result is the backend's output buffer, valid until the next call (copy it to keep it)."""
        token_ids = check_token_ids(self.name, token_ids, self.embed_table.shape[0])
        positions = check_positions(self.name, position_ids, token_ids.size)
        check_slot(self.name, slot, self.max_batch)
        check_capacity(self.name, self.slot_length(slot), token_ids.size, self.max_context)
        if self.max_batch > 1:   # one slot of several (a branch's own prompt): a batched call, the others idle
            k = token_ids.size
            tokens = np.zeros((slot + 1, k), np.int64)
            rows_positions = np.zeros((3, slot + 1, k), np.int64)
            counts = np.zeros(slot + 1, np.int64)
            tokens[slot], rows_positions[:, slot], counts[slot] = token_ids, positions, k
            self._append_rows(tokens, rows_positions, counts, self._slot_hidden)
            return self._slot_hidden[slot]
        for start in range(0, token_ids.size, self._chunk):
            chunk = token_ids[start:start + self._chunk]
            k = chunk.size
            self._host_embeds[:k] = self.embed_table[chunk]
            self._host_positions[:, :k] = positions[:, start:start + k]
            self.memory.to_device(self._embeds, self._host_embeds[:k])
            self.memory.to_device(self._positions, np.ascontiguousarray(self._host_positions[:, :k]))
            hidden = self._run("decode", k)
        return hidden

    def step_batch(self, token_ids: np.ndarray, position_ids: np.ndarray, counts: np.ndarray) -> Any:
        """One step of slots 0..B-1 (see ``BatchBackend.step_batch``): [B, H], valid until the next step."""
        if self.max_batch == 1:
            raise BackendError("trt backend: step_batch needs max_batch > 1")
        token_ids, positions, counts = check_batch_step(self.name, token_ids, position_ids, counts, self.max_batch,
                                                        self.embed_table.shape[0])
        for slot in np.flatnonzero(counts):
            check_capacity(self.name, self.slot_length(int(slot)), int(counts[slot]), self.max_context)
        self._append_rows(token_ids, positions, counts, self._rows_hidden)
        return self._rows_hidden[:token_ids.shape[0]]

    def copy_slot(self, source: int, target: int) -> None:
        """Slot ``target`` gets a copy of ``source``'s cache (branches that share a prefill), on the device."""
        check_slot(self.name, source, self.max_batch)
        check_slot(self.name, target, self.max_batch)
        if self.max_batch == 1:
            raise BackendError("trt backend: copying a KV slot needs max_batch > 1")
        self._slots.copy_row(source, target)

    # internals ------------------------------------------------------------------------
    def _enqueue(self, profile: str, rows: int, tokens: int, past_length: int,
                 past: list[tuple[DeviceBuffer, DeviceBuffer]], present: list[tuple[DeviceBuffer, DeviceBuffer]]
                 ) -> None:
        """One decoder call: [rows, tokens] embeddings and positions from their buffers after ``past_length``
        cached tokens (``past``; ``present`` takes them and the new ones), hidden states into ``_hidden``."""
        cfg, context = self.config, self._contexts[profile]
        context.set_input_shape(schema.INPUTS_EMBEDS, (rows, tokens, cfg.hidden_size))
        context.set_input_shape(schema.POSITION_IDS, (3, rows, tokens))
        context.set_tensor_address(schema.INPUTS_EMBEDS, self._embeds.ptr)
        context.set_tensor_address(schema.POSITION_IDS, self._positions.ptr)
        context.set_tensor_address(schema.HIDDEN_STATES, self._hidden.ptr)
        if self._has_key_valid:
            context.set_input_shape(schema.KEY_VALID, (rows, past_length + tokens))
            context.set_tensor_address(schema.KEY_VALID, self._key_valid.ptr)
        past_shape = (rows, cfg.num_key_value_heads, past_length, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            for j, kind in enumerate(schema.KV_KINDS):
                context.set_input_shape(schema.past(kind, i), past_shape)
                context.set_tensor_address(schema.past(kind, i), past[i][j].ptr)
                context.set_tensor_address(schema.present(kind, i), present[i][j].ptr)
        self._execute(context, schema.DECODER)

    def _run(self, profile: str, tokens: int) -> Any:
        """One sequence: enqueue a decoder call over the current cache side; swap sides; the last hidden state."""
        hidden = self.config.hidden_size
        self._enqueue(profile, 1, tokens, self._length, self._kv[self._side], self._kv[1 - self._side])
        last = (tokens - 1) * hidden * 4
        if self._device_head:
            with self.memory.torch.cuda.stream(self.memory.stream):
                self._last_hidden.copy_(self._hidden.owner[last:last + hidden * 4].view(self._last_hidden.dtype))
        else:
            self.memory.to_host(self._host_hidden, self._hidden, offset=last)
        self.memory.synchronize()
        self._side = 1 - self._side
        self._length += tokens
        return self._last_hidden if self._device_head else self._host_hidden

    def _keep_row(self, out: Any, row: int, offset: int) -> None:
        """``out[row]`` = the hidden state at byte ``offset`` of ``_hidden`` (on the device, or copied to the host)."""
        if self._device_head:
            with self.memory.torch.cuda.stream(self.memory.stream):
                size = self.config.hidden_size * 4
                out[row].copy_(self._hidden.owner[offset:offset + size].view(out.dtype))
        else:
            self.memory.to_host(out[row], self._hidden, offset=offset)

    def _prefill_slot(self, slot: int, tokens: int) -> Any:
        """A prompt (its embeddings and positions already on the device) run as one sequence into the spare
        cache side, then copied into row ``slot`` (rows widened first when it is longer than P)."""
        slots = self._slots
        if tokens > slots.past:
            slots.widen(tokens)
        self.memory.to_device(self._key_valid, self._prompt_valid[:tokens])
        self._enqueue("prefill", 1, tokens, 0, slots.current, slots.spare)
        slots.insert(slot, tokens)
        self._keep_row(self._slot_hidden, slot, (tokens - 1) * self.config.hidden_size * 4)
        self.memory.synchronize()
        return self._slot_hidden[slot]

    def _append_rows(self, token_ids: np.ndarray, positions: np.ndarray, counts: np.ndarray, out: Any) -> None:
        """Append row b's first ``counts[b]`` of [B, T] tokens to slot b, the decode profile's token count per
        call; ``out[b]`` gets the hidden state after row b's last real token. Every row in use takes part (a
        call's batch covers each row's cache); rows past B and past their count append holes."""
        slots, hidden, chunk = self._slots, self.config.hidden_size, self._chunk
        given, width = token_ids.shape
        rows = max(slots.rows, given)
        slots.rows = rows
        all_counts = np.zeros(rows, np.int64)
        all_counts[:given] = counts
        for start in range(0, width, chunk):
            t = min(chunk, width - start)
            if slots.past + t > slots.capacity:
                slots.compact()
            embeds = self._host_rows_in[:rows * t * hidden].reshape(rows, t, hidden)
            embeds[:given] = self.embed_table[token_ids[:, start:start + t]]
            embeds[given:] = 0.0
            staged = self._host_rows_positions[:3 * rows * t].reshape(3, rows, t)
            staged[:, :given] = positions[:, :, start:start + t]
            staged[:, given:] = 0
            self.memory.to_device(self._embeds, embeds)
            self.memory.to_device(self._positions, staged)
            self.memory.to_device(self._key_valid, slots.key_valid(rows, t, self._host_key_valid))
            self._enqueue("decode", rows, t, slots.past, slots.current, slots.spare)
            real = np.clip(all_counts - start, 0, t)
            for b in np.flatnonzero((all_counts > start) & (all_counts <= start + t)):
                self._keep_row(out, int(b), (int(b) * t + int(all_counts[b]) - 1 - start) * hidden * 4)
            # the staged inputs and the rows kept must be read before the next chunk overwrites them
            self.memory.synchronize()
            slots.appended(t, real)

    def _execute(self, context: Any, what: str) -> None:
        if not context.execute_async_v3(self.memory.stream_handle):
            raise BackendError(f"trt backend: TensorRT could not enqueue the {what} engine (see its log)")


def _check_bundle(bundle: Bundle, max_batch: int) -> None:
    """A trt-flavour bundle whose decoder takes ``max_batch`` rows (a per-row key mask, a batch range)."""
    if bundle.flavour != "trt":
        raise BackendError(f"trt backend: {bundle.directory} holds a {bundle.flavour!r} decoder graph; export "
                           f"with --flavour trt and build engines with `rexedge build`")
    if max_batch == 1:
        return
    bundle_batch = bundle.decoder.dims.get(schema.BATCH_DIM, (1, 1))[1]
    if max_batch > bundle_batch or schema.KEY_VALID not in bundle.decoder.input_names():
        raise BackendError(f"trt backend: max_batch={max_batch}, but the decoder of {bundle.directory} steps at most "
                           f"{1 if schema.KEY_VALID not in bundle.decoder.input_names() else bundle_batch} "
                           f"sequence(s) together (exported before batched decoding on trt: no {schema.KEY_VALID} "
                           f"input?); re-export it with this rexedge (rexedge export --flavour trt), rebuild its "
                           f"engines, or use max_batch=1")


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
