"""A bundle's decoder graph on ONNX Runtime with its KV cache: the one session the ``ort`` backend,
calibration and the benchmarks run.

A session appends T tokens (embeddings [T, H] float32, positions [3, T] int64) to its cache and
returns the last one's hidden state. How the cache travels is what differs, and is each subclass's:

- :class:`InPlaceSession` (``ort`` flavour, GroupQueryAttention): one max-length buffer per layer
  for keys and one for values (``[1, kv_heads, capacity, head_dim]``), each bound with IOBinding as
  both the ``past_*`` input and the ``present_*`` output, so the graph writes the new keys/values in
  place and a step never copies the cache. Single-token steps run through host buffers wrapped
  once as OrtValues and bound once.
- :class:`SlotSession` (``ort`` flavour, several sequences): one buffer per layer and kind of
  ``max_batch`` slots (``[max_batch, kv_heads, capacity, head_dim]``), allocated once. A call binds the
  first B slots (or one slot) by address, so a step of B sequences and the prefill of one slot run on
  the same memory; GroupQueryAttention takes each row's own length (``seqlens_k``).
- :class:`PingPongSession` (``trt`` flavour, Concat): ``past_*`` [1, KVH, P, D] in, ``present_*``
  [1, KVH, P + T, D] out, into two buffers per layer sized to the capacity that swap roles each
  call (the ``trt`` backend's scheme on the GPU), bound with IOBinding.
- :class:`ArraySession` (either flavour): a plain ``run`` with the cache as numpy arrays, the
  ``present_*`` outputs becoming the next call's cache. It copies the cache every call, which is
  fine offline (calibration records every call's complete feeds) and why the runtime never does it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.base import BackendError
from rexedge.runtime.config import RexOmniConfig

Feeds = dict[str, np.ndarray]
CPU = ["CPUExecutionProvider"]
# ONNX Runtime turns Q -> DQ -> MatMul <- DQ(weight) into an integer MatMul only where the
# activation's DQ feeds that one MatMul. `rexedge calibrate` writes one Q/DQ pair per consumer;
# common-subexpression elimination would merge the pairs of q/k/v (and gate/up) again, leaving
# float MatMuls that dequantize their weights on every run (measured: 9x slower decode steps).
DISABLED_OPTIMIZERS: dict[str, list[str]] = {"int8": ["CommonSubexpressionElimination"]}


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    # ONNX Runtime's worker threads spin after each run by default; on a small edge CPU they
    # then steal the cores that preprocessing and the host-side head need (measured here:
    # a 640x480 detection at 60-68 ms with spinning, 20-25 ms without)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(path: Path, threads: int | None = None, precision: str = "fp32", providers: list = CPU,
                 device: str = "cpu", who: str = "ort backend", optimized: bool = False) -> ort.InferenceSession:
    """An InferenceSession over the graph at ``path``; a graph this onnxruntime cannot load, or a CUDA
    request it could not honour, is a BackendError naming ``who`` asked. ``optimized``: the graph is one
    ONNX Runtime saved already optimized (``rexedge prepack``), so its optimizers do not run again."""
    options = session_options(threads)
    if optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=providers,
                                       disabled_optimizers=DISABLED_OPTIMIZERS.get(precision, []))
    except Exception as e:  # onnxruntime raises its own exception types with a message
        # e.g. an older onnxruntime without a contrib operator the graph uses (bundles use
        # GroupQueryAttention, MultiHeadAttention and RotaryEmbedding on the CPU)
        raise BackendError(f"{who}: onnxruntime {ort.__version__} cannot load {path} ({e})") from None
    if device != "cpu" and "CUDAExecutionProvider" not in session.get_providers():
        raise BackendError(f"{who}: onnxruntime could not start CUDA for {path} (it fell back to "
                           f"{session.get_providers()}); check the CUDA and cuDNN libraries")
    return session


def sequence_feeds(length: int, tokens: int) -> Feeds:
    """The ``ort`` flavour's GroupQueryAttention lengths after appending ``tokens`` to ``length``."""
    return {schema.SEQLENS_K: np.array([length + tokens - 1], np.int32),
            schema.TOTAL_SEQUENCE_LENGTH: np.array(length + tokens, np.int32)}


class DecoderSession:
    """A decoder graph and the cache it appends to; ``length`` tokens are cached."""

    def __init__(self, session: ort.InferenceSession, config: RexOmniConfig, kv_dtype: type = np.float32) -> None:
        self.session, self.config, self.kv_dtype = session, config, kv_dtype
        self.length = 0
        # the trt flavour's per-row key mask (bundles exported before batched decoding on trt have none)
        self._key_valid = schema.KEY_VALID in {i.name for i in session.get_inputs()}

    def key_valid_feeds(self, tokens: int) -> Feeds:
        """``key_valid`` of one sequence appending ``tokens`` (no holes: every key valid), if the graph takes it."""
        return {schema.KEY_VALID: np.ones((1, self.length + tokens), bool)} if self._key_valid else {}

    def kv_shape(self, length: int) -> tuple[int, int, int, int]:
        return (1, self.config.num_key_value_heads, length, self.config.head_dim)

    def cache_names(self, name: Callable[[str, int], str]) -> list[str]:
        """``name(kind, layer)`` (:func:`schema.past` or :func:`schema.present`) for every layer and kind, in
        that order."""
        return [name(kind, i) for i in range(self.config.num_hidden_layers) for kind in schema.KV_KINDS]

    def reset(self) -> None:
        """Forget the cached tokens (the next append starts a prompt)."""
        self.length = 0

    def append(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run T tokens (embeddings [T, H], positions [3, T]) into the cache; the last hidden state [H]."""
        hidden = self._run(embeds, positions)
        self.length += embeds.shape[0]
        return hidden

    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _token_feeds(embeds: np.ndarray, positions: np.ndarray) -> Feeds:
        return {schema.INPUTS_EMBEDS: np.ascontiguousarray(embeds[None], dtype=np.float32),
                schema.POSITION_IDS: np.ascontiguousarray(positions[:, None, :], dtype=np.int64)}


class InPlaceSession(DecoderSession):
    """The ``ort`` flavour with one max-length KV buffer per layer and kind, bound once (see the module)."""

    def __init__(self, session: ort.InferenceSession, config: RexOmniConfig, capacity: int,
                 kv_dtype: type = np.float32, device_type: str = "cpu", device_id: int = 0) -> None:
        super().__init__(session, config, kv_dtype)
        self._kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros(self.kv_shape(capacity), kv_dtype), device_type,
                                                     device_id) for _ in self.cache_names(schema.past)]
        hidden = config.hidden_size
        # single-token step: inputs and output live in these buffers for the session's lifetime
        self._step = {schema.INPUTS_EMBEDS: np.zeros((1, 1, hidden), np.float32),
                      schema.POSITION_IDS: np.zeros((3, 1, 1), np.int64), **sequence_feeds(0, 1)}
        self._step_hidden = np.zeros((1, 1, hidden), np.float32)
        self._step_binding, self._step_values = self._bind(self._step, self._step_hidden)

    def _bind(self, feeds: Feeds, hidden: np.ndarray) -> tuple[ort.IOBinding, list[ort.OrtValue]]:
        """An IOBinding over these host buffers (wrapped, not copied) and the shared KV buffers.

        The binding does not own the host memory: keep the returned OrtValues (which hold
        the arrays) alive for as long as the binding is used."""
        binding = self.session.io_binding()
        values = _bind_host(binding, feeds, hidden)
        for past, present, value in zip(self.cache_names(schema.past), self.cache_names(schema.present), self._kv):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding, values

    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        tokens = embeds.shape[0]
        if tokens == 1:
            step = self._step
            step[schema.INPUTS_EMBEDS][0] = embeds
            step[schema.POSITION_IDS][:, 0, 0] = positions[:, 0]
            step[schema.SEQLENS_K][0] = self.length
            step[schema.TOTAL_SEQUENCE_LENGTH][()] = self.length + 1
            self.session.run_with_iobinding(self._step_binding)
            # a view of the session's output buffer, valid until the next call
            return self._step_hidden[0, 0]
        hidden = np.empty((1, tokens, self.config.hidden_size), np.float32)
        binding, values = self._bind({**self._token_feeds(embeds, positions), **sequence_feeds(self.length, tokens)},
                                     hidden)
        self.session.run_with_iobinding(binding)
        del values  # the host buffers had to outlive the run
        return hidden[0, -1]


def _bind_host(binding: ort.IOBinding, feeds: Feeds, hidden: np.ndarray) -> list[ort.OrtValue]:
    """Bind host ``feeds`` as inputs and ``hidden`` as the hidden-states output, wrapped (not copied);
    the returned OrtValues hold the arrays and must outlive every run of the binding."""
    values = []
    for name, array in feeds.items():
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        binding.bind_ortvalue_input(name, values[-1])
    values.append(ort.OrtValue.ortvalue_from_numpy(hidden))
    binding.bind_ortvalue_output(schema.HIDDEN_STATES, values[-1])
    return values


_ORT_ELEMENT = {np.dtype(np.float32): np.float32, np.dtype(np.float16): np.float16}


class SlotSession:
    """The ``ort`` flavour over ``max_batch`` KV slots (see the module): ``append_slot`` runs one sequence
    into one slot, ``append_rows`` one step of the first B slots, rows padded to the longest."""

    def __init__(self, session: ort.InferenceSession, config: RexOmniConfig, max_batch: int, capacity: int,
                 kv_dtype: type = np.float32, device_type: str = "cpu", device_id: int = 0) -> None:
        self.session, self.config, self.max_batch, self.capacity = session, config, max_batch, capacity
        self.device_type, self.device_id = device_type, device_id
        self.kv_dtype = np.dtype(kv_dtype)
        self.lengths = np.zeros(max_batch, np.int64)
        shape = (max_batch, config.num_key_value_heads, capacity, config.head_dim)
        self._slot_bytes = int(np.prod(shape[1:])) * self.kv_dtype.itemsize
        names = [(schema.past(kind, i), schema.present(kind, i))
                 for i in range(config.num_hidden_layers) for kind in schema.KV_KINDS]
        arrays = [np.zeros(shape, self.kv_dtype) for _ in names]
        # on the CPU an OrtValue wraps its array (no copy): copy_slot works on the arrays
        self._host = arrays if device_type == "cpu" else None
        self._kv = [(past, present, ort.OrtValue.ortvalue_from_numpy(array, device_type, device_id))
                    for (past, present), array in zip(names, arrays)]
        # single-token steps of B rows: host buffers and a binding kept per B (built on first use)
        self._token_steps: dict[int, tuple[Feeds, np.ndarray, ort.IOBinding, list[ort.OrtValue]]] = {}

    def _bind(self, first: int, rows: int, feeds: Feeds, hidden: np.ndarray) -> tuple[ort.IOBinding, list]:
        """Inputs and output wrapped (not copied), and slots first..first+rows-1 of every KV buffer bound
        by address as both past_* and present_*; keep the returned values alive while the binding is used."""
        binding = self.session.io_binding()
        values = _bind_host(binding, feeds, hidden)
        shape = [rows, self.config.num_key_value_heads, self.capacity, self.config.head_dim]
        element = _ORT_ELEMENT[self.kv_dtype]
        for past, present, value in self._kv:
            address = value.data_ptr() + first * self._slot_bytes
            binding.bind_input(past, self.device_type, self.device_id, element, shape, address)
            binding.bind_output(present, self.device_type, self.device_id, element, shape, address)
        return binding, values

    def append_slot(self, slot: int, embeds: np.ndarray, positions: np.ndarray, reset: bool = False) -> np.ndarray:
        """Run T tokens into ``slot`` (after its cached tokens, or from 0 with ``reset``); the last hidden [H]."""
        if reset:
            self.lengths[slot] = 0
        tokens, length = embeds.shape[0], int(self.lengths[slot])
        hidden = np.empty((1, tokens, self.config.hidden_size), np.float32)
        feeds = {**DecoderSession._token_feeds(embeds, positions), **sequence_feeds(length, tokens)}
        binding, values = self._bind(slot, 1, feeds, hidden)
        self.session.run_with_iobinding(binding)
        del values
        self.lengths[slot] += tokens
        return hidden[0, -1]

    def copy_slot(self, source: int, target: int) -> None:
        """Slot ``target`` holds what ``source`` holds (its cached tokens, copied)."""
        if self._host is None:
            raise BackendError(f"ort backend: copying a KV slot runs on the CPU, not on {self.device_type}")
        length = int(self.lengths[source])
        for buffer in self._host:
            buffer[target, :, :length] = buffer[source, :, :length]
        self.lengths[target] = length

    def append_rows(self, embeds: np.ndarray, positions: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """One step of slots 0..B-1: embeds [B, T, H], positions [3, B, T], counts [B] real tokens per row
        (the rest padding; 0: a row not stepping). Returns [B, H] (a new array).

        ONNX Runtime's GroupQueryAttention takes several rows only one token at a time ("batch_size
        must be 1 when sequence_length > 1 and past context is given"), so a step with jump-forward runs
        is grouped: one call for the rows appending one token, then one batch-1 call per longer run."""
        rows, tokens = embeds.shape[:2]
        if tokens == 1:
            return self._append_tokens(embeds, positions, counts)
        single = np.where(counts == 1, 1, 0)
        hidden = np.empty((rows, self.config.hidden_size), np.float32)
        if single.any():
            last = int(np.flatnonzero(single)[-1]) + 1
            hidden[:last] = self._append_tokens(embeds[:last, :1], positions[:, :last, :1], single[:last])
        for row in np.flatnonzero(counts > 1):
            k = int(counts[row])
            hidden[row] = self.append_slot(int(row), embeds[row, :k], positions[:, row, :k])
        return hidden

    def _append_tokens(self, embeds: np.ndarray, positions: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """One token per row of slots 0..B-1 (embeds [B, 1, H]); a row with count 0 writes its token past
        its cached ones (room the padding slots leave), where the row's next append overwrites it."""
        rows = embeds.shape[0]
        feeds, hidden, binding, _ = self._token_step(rows)
        feeds[schema.INPUTS_EMBEDS][...] = embeds
        feeds[schema.POSITION_IDS][...] = positions
        # seqlens_k: each row's total length - 1 after the token
        feeds[schema.SEQLENS_K][...] = self.lengths[:rows]
        feeds[schema.TOTAL_SEQUENCE_LENGTH][()] = int(self.lengths[:rows].max()) + 1
        self.session.run_with_iobinding(binding)
        self.lengths[:rows] += counts
        return hidden[:, 0].copy()

    def _token_step(self, rows: int) -> tuple[Feeds, np.ndarray, ort.IOBinding, list]:
        entry = self._token_steps.get(rows)
        if entry is None:
            hidden_size = self.config.hidden_size
            feeds = {schema.INPUTS_EMBEDS: np.zeros((rows, 1, hidden_size), np.float32),
                     schema.POSITION_IDS: np.zeros((3, rows, 1), np.int64),
                     schema.SEQLENS_K: np.zeros(rows, np.int32), schema.TOTAL_SEQUENCE_LENGTH: np.zeros((), np.int32)}
            hidden = np.zeros((rows, 1, hidden_size), np.float32)
            entry = self._token_steps[rows] = (feeds, hidden, *self._bind(0, rows, feeds, hidden))
        return entry


class PingPongSession(DecoderSession):
    """The ``trt`` flavour with two KV buffers per layer and kind sized to ``capacity`` (see the module)."""

    def __init__(self, session: ort.InferenceSession, config: RexOmniConfig, capacity: int) -> None:
        super().__init__(session, config, np.float32)
        flat = int(np.prod(self.kv_shape(capacity)))
        self._sides = [[np.empty(flat, np.float32) for _ in self.cache_names(schema.past)] for _ in range(2)]
        self._side = 0

    def reset(self) -> None:
        super().reset()
        self._side = 0

    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        tokens, p = embeds.shape[0], self.length
        binding = self.session.io_binding()
        feeds = {**self._token_feeds(embeds, positions), **self.key_valid_feeds(tokens)}
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        hidden = np.empty((1, tokens, self.config.hidden_size), np.float32)
        binding.bind_output(schema.HIDDEN_STATES, "cpu", 0, np.float32, list(hidden.shape), hidden.ctypes.data)
        past, present = self._sides[self._side], self._sides[1 - self._side]
        for name, buffer in zip(self.cache_names(schema.past), past):
            binding.bind_input(name, "cpu", 0, np.float32, list(self.kv_shape(p)), buffer.ctypes.data)
        for name, buffer in zip(self.cache_names(schema.present), present):
            binding.bind_output(name, "cpu", 0, np.float32, list(self.kv_shape(p + tokens)), buffer.ctypes.data)
        self.session.run_with_iobinding(binding)
        self._side = 1 - self._side
        return hidden[0, -1]


class ArraySession(DecoderSession):
    """Either flavour with the cache as numpy arrays passed in and returned (see the module);
    ``on_feeds`` is called with each run's complete feeds before it runs (they are not modified
    afterwards, so they may be kept)."""

    def __init__(self, session: ort.InferenceSession, config: RexOmniConfig, flavour: str, kv_dtype: type,
                 on_feeds: Callable[[Feeds], None] | None = None) -> None:
        super().__init__(session, config, kv_dtype)
        self.flavour, self.on_feeds = flavour, on_feeds
        self._outputs = [o.name for o in session.get_outputs()]
        self._cache: Feeds = {}

    @property
    def started(self) -> bool:
        return bool(self._cache)

    def reset(self, capacity: int = 0) -> None:
        """Start a prompt with an empty cache of ``capacity`` slots (the ``ort`` flavour's buffer is
        fixed once allocated; the ``trt`` flavour's grows, from 0)."""
        super().reset()
        self._cache = {name: np.zeros(self.kv_shape(capacity), self.kv_dtype) for name in self.cache_names(schema.past)}

    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feeds = {**self._token_feeds(embeds, positions), **self._cache}
        if self.flavour == "ort":
            feeds.update(sequence_feeds(self.length, embeds.shape[0]))
        else:
            feeds.update(self.key_valid_feeds(embeds.shape[0]))
        if self.on_feeds:
            self.on_feeds(feeds)
        results = dict(zip(self._outputs, self.session.run(self._outputs, feeds)))
        self._cache = {past: results[present] for past, present in
                       zip(self.cache_names(schema.past), self.cache_names(schema.present))}
        return results[schema.HIDDEN_STATES][0, -1]


class HeadSession:
    """A bundle's quantized full-vocabulary head graph (hidden [n, H] -> logits [n, vocab] float32) through host
    buffers bound once per row count n: a call copies the hidden states in (n x H floats) and nothing else. The
    buffers hold the most rows asked for so far (one row, or a batched step's full-vocabulary rows); every row
    count binds a view of their first n rows."""

    def __init__(self, session: ort.InferenceSession, hidden_size: int, vocab_size: int) -> None:
        self.session, self.hidden_size, self.vocab_size = session, hidden_size, vocab_size
        self._hidden = np.zeros((0, hidden_size), np.float32)
        self._logits = np.zeros((0, vocab_size), np.float32)
        self._bindings: dict[int, tuple[ort.IOBinding, list[ort.OrtValue]]] = {}

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Logits of every row for ``hidden`` [n, H]: [n, vocab], a view of the output buffer, rewritten by the
        next call."""
        rows = hidden.shape[0]
        if rows > self._hidden.shape[0]:   # bigger buffers: the views bound before would point at freed memory
            self._hidden = np.zeros((rows, self.hidden_size), np.float32)
            self._logits = np.zeros((rows, self.vocab_size), np.float32)
            self._bindings.clear()
        bound = self._bindings.get(rows)
        if bound is None:
            binding = self.session.io_binding()
            values = [ort.OrtValue.ortvalue_from_numpy(a[:rows]) for a in (self._hidden, self._logits)]
            binding.bind_ortvalue_input(schema.HIDDEN_STATES, values[0])
            binding.bind_ortvalue_output(schema.LOGITS, values[1])
            bound = self._bindings[rows] = (binding, values)
        self._hidden[:rows] = hidden
        self.session.run_with_iobinding(bound[0])
        return self._logits[:rows]
