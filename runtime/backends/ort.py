"""The ``ort`` backend: a bundle's vision and decoder graphs on ONNX Runtime.

The KV cache is one max-length buffer per layer for keys and one for values
(``[1, kv_heads, max_context, head_dim]``), each bound with IOBinding as both the
decoder's ``past_*`` input and its ``present_*`` output: GroupQueryAttention writes the
new keys/values into it in place, so a step never copies the cache and its cost does not
grow with a copy of the context. For single-token steps every input and the output
are pre-allocated numpy buffers wrapped once as OrtValues and bound once; a step writes
the token's embedding and positions into them and runs.

Devices: ``cpu`` (default) or ``cuda`` / ``cuda:N``, which needs the CUDA execution
provider of ``onnxruntime-gpu``; without it that is an error, never a silent CPU fallback.
Importing this module imports onnxruntime and numpy only (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from rexedge.runtime.backends.base import (
    DEFAULT_MAX_CONTEXT,
    BackendError,
    HostHeadBackend,
    check_capacity,
    check_embeds,
    check_image,
    check_positions,
    check_token_ids,
)
from rexedge.runtime import manifest as schema
from rexedge.runtime.bundle import load_bundle

if TYPE_CHECKING:
    from rexedge.runtime.request.preprocess import PreprocessedImage

_KV_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.float32}  # int8: Q/DQ graphs, float32 cache
# ONNX Runtime turns Q -> DQ -> MatMul <- DQ(weight) into an integer MatMul only where the
# activation's DQ feeds that one MatMul. `rexedge calibrate` writes one Q/DQ pair per consumer;
# common-subexpression elimination would merge the pairs of q/k/v (and gate/up) again, leaving
# float MatMuls that dequantize their weights on every run (measured: 9x slower decode steps).
DISABLED_OPTIMIZERS: dict[str, list[str]] = {"int8": ["CommonSubexpressionElimination"]}


def _options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    # ONNX Runtime's worker threads spin after each run by default; on a small edge CPU they
    # then steal the cores that preprocessing and the host-side head need (measured here:
    # a 640x480 detection at 60-68 ms with spinning, 20-25 ms without)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


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
                 threads: int | None = None, verify_hashes: bool = True) -> None:
        providers, device_type, device_id = _providers(device)
        bundle = load_bundle(model_path, verify_hashes=verify_hashes)
        if bundle.flavour != "ort":
            raise BackendError(f"ort backend: {bundle.directory} holds a {bundle.flavour!r} decoder graph; "
                               f"export with --flavour ort")
        cfg = bundle.config
        if not 1 <= max_context <= cfg.max_position_embeddings:
            raise BackendError(f"ort backend: max_context must be in 1..{cfg.max_position_embeddings}, "
                               f"got {max_context}")
        disabled = DISABLED_OPTIMIZERS.get(bundle.precision, [])
        # The vision graph's activations change size with every image, and ONNX Runtime's CPU
        # arena keeps the largest ever seen. So the arena serves the blocks within one run and
        # gives its memory back after each run (arena shrinkage). cpu-bench preset, 1,479 image
        # tokens, ort flavour (flash attention), 6 runs each: 0.93 s, peak RSS 411 MB, 193 MB
        # resident afterwards; without an arena 0.97-1.0 s, 550 MB, 250-280 MB; an arena kept
        # 0.86 s, 597 MB, 597 MB (an older dense-attention graph kept 2.9 GB that way).
        self._vision = self._session(bundle.path(bundle.vision.file), _options(threads), providers,
                                     device, disabled)
        self._vision_run = ort.RunOptions()
        self._vision_run.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._decoder = self._session(bundle.path(bundle.decoder.file), _options(threads), providers,
                                      device, disabled)

        self.bundle = bundle
        self._layout_inputs = [n for n in bundle.vision.input_names() if n != schema.PIXEL_PATCHES]
        self.config = cfg
        self.tokenizer = bundle.load_tokenizer()
        self.embed_table = bundle.load_embed_table()
        self.max_context = max_context
        self._length = 0

        layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
        kv_shape = (1, cfg.num_key_value_heads, max_context, cfg.head_dim)
        kv_dtype = _KV_DTYPES[bundle.precision]
        self._kv = [
            [ort.OrtValue.ortvalue_from_numpy(np.zeros(kv_shape, kv_dtype), device_type, device_id) for _ in range(2)]
            for _ in range(layers)
        ]
        # single-token step: inputs and output live in these buffers for the backend's lifetime
        self._step_embeds = np.zeros((1, 1, hidden), np.float32)
        self._step_positions = np.zeros((3, 1, 1), np.int64)
        self._step_seqlens = np.zeros(1, np.int32)
        self._step_total = np.zeros((), np.int32)
        self._step_hidden = np.zeros((1, 1, hidden), np.float32)
        self._step_binding, self._step_values = self._bind(
            self._step_embeds, self._step_positions, self._step_seqlens, self._step_total, self._step_hidden)

    @staticmethod
    def _session(path: Path, options: ort.SessionOptions, providers: list, device: str,
                 disabled_optimizers: list[str]) -> ort.InferenceSession:
        try:
            session = ort.InferenceSession(str(path), options, providers=providers,
                                           disabled_optimizers=disabled_optimizers)
        except Exception as e:  # onnxruntime raises its own exception types with a message
            # e.g. an older onnxruntime without a contrib operator the graph uses (bundles use
            # GroupQueryAttention, MultiHeadAttention and RotaryEmbedding on the CPU)
            raise BackendError(f"ort backend: onnxruntime {ort.__version__} cannot load {path} ({e})") from None
        if device != "cpu" and "CUDAExecutionProvider" not in session.get_providers():
            raise BackendError(f"ort backend: onnxruntime could not start CUDA for {path} (it fell back to "
                               f"{session.get_providers()}); check the CUDA and cuDNN libraries")
        return session

    def _bind(self, embeds: np.ndarray, positions: np.ndarray, seqlens: np.ndarray, total: np.ndarray,
              hidden: np.ndarray) -> tuple[ort.IOBinding, list[ort.OrtValue]]:
        """An IOBinding over these host buffers (wrapped, not copied) and the shared KV buffers.

        The binding does not own the host memory: keep the returned OrtValues (which hold
        the arrays) alive for as long as the binding is used."""
        binding = self._decoder.io_binding()
        host = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in (
            (schema.INPUTS_EMBEDS, embeds), (schema.POSITION_IDS, positions), (schema.SEQLENS_K, seqlens),
            (schema.TOTAL_SEQUENCE_LENGTH, total), (schema.HIDDEN_STATES, hidden))}
        for name, value in host.items():
            if name == schema.HIDDEN_STATES:
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for i, (key, value) in enumerate(self._kv):
            binding.bind_ortvalue_input(schema.past("key", i), key)
            binding.bind_ortvalue_input(schema.past("value", i), value)
            binding.bind_ortvalue_output(schema.present("key", i), key)
            binding.bind_ortvalue_output(schema.present("value", i), value)
        return binding, list(host.values())

    def encode_image(self, image: PreprocessedImage) -> np.ndarray:
        check_image(self.name, image, self.config)
        feeds = {schema.PIXEL_PATCHES: np.ascontiguousarray(image.pixel_patches, dtype=np.float32)}
        # the other inputs are the VisionLayout arrays of the same names
        feeds.update({name: getattr(image.layout, name) for name in self._layout_inputs})
        return self._vision.run([schema.IMAGE_EMBEDS], feeds, self._vision_run)[0]

    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Append T tokens (embeddings [T, H], positions [3, T]) with a binding made for this call."""
        tokens = embeds.shape[0]
        check_capacity(self.name, self._length, tokens, self.max_context)
        hidden = np.empty((1, tokens, self.config.hidden_size), np.float32)
        binding, values = self._bind(np.ascontiguousarray(embeds[None], dtype=np.float32),
                                     np.ascontiguousarray(positions[:, None, :], dtype=np.int64),
                                     np.array([self._length + tokens - 1], np.int32),
                                     np.array(self._length + tokens, np.int32), hidden)
        self._decoder.run_with_iobinding(binding)
        del values  # the host buffers had to outlive the run
        self._length += tokens
        return hidden[0, -1]

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        embeds = check_embeds(self.name, inputs_embeds, self.config.hidden_size)
        positions = check_positions(self.name, position_ids, embeds.shape[0])
        self._length = 0
        return self._run(embeds, positions)

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Append tokens; for one token the result is a view of the backend's output buffer,
        valid until the next call (copy it to keep it)."""
        token_ids = check_token_ids(self.name, token_ids, self.embed_table.shape[0])
        positions = check_positions(self.name, position_ids, token_ids.size)
        if token_ids.size > 1:
            return self._run(self.embed_table[token_ids], positions)
        check_capacity(self.name, self._length, 1, self.max_context)
        self._step_embeds[0, 0] = self.embed_table[token_ids[0]]
        self._step_positions[:, 0, 0] = positions[:, 0]
        self._step_seqlens[0] = self._length
        self._step_total[()] = self._length + 1
        self._decoder.run_with_iobinding(self._step_binding)
        self._length += 1
        return self._step_hidden[0, 0]
