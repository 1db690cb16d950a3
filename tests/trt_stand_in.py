"""A CPU stand-in for the trt backend's engines: the trt-flavour graphs on ONNX Runtime behind TensorRT's
execution-context methods, over host memory behind the CUDA memory provider's.

``TrtBackend.from_engines(bundle, stand_in_engines(bundle), ...)`` then runs every line of the backend's
buffer, shape and cache bookkeeping; only the engine call and the copies are the stand-in's. Like
TensorRT, a context checks each input shape against its optimization profile and writes outputs at the
addresses it was given (here it refuses an output that would not fit the buffer there). Memory starts
as 0xFF bytes (NaN in float32 and float16), so a slot the backend reads without having written shows.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.cuda_memory import DeviceBuffer, check_2d
from rexedge.runtime.backends.trt import TrtEngines
from rexedge.runtime.bundle import load_bundle

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class HostMemory:
    """``CudaMemory`` over numpy arrays: a buffer's ``ptr`` is its array's address."""

    provider = "host stand-in"
    stream_handle = 0

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.copies_2d = 0

    def alloc(self, nbytes: int) -> DeviceBuffer:
        array = np.full(max(nbytes, 1), 0xFF, np.uint8)
        self.buffers[array.ctypes.data] = array
        return DeviceBuffer(array.ctypes.data, nbytes, array)

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    def to_device(self, dst: DeviceBuffer, src: np.ndarray, offset: int = 0) -> None:
        data = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
        assert offset + data.size <= dst.nbytes
        dst.owner[offset:offset + data.size] = data

    def to_host(self, dst: np.ndarray, src: DeviceBuffer, offset: int = 0) -> None:
        assert dst.flags.c_contiguous and offset + dst.nbytes <= src.nbytes
        dst.reshape(-1).view(np.uint8)[:] = src.owner[offset:offset + dst.nbytes]

    def copy_2d(self, dst: DeviceBuffer, dst_offset: int, dst_pitch: int, src: DeviceBuffer, src_offset: int,
                src_pitch: int, width: int, height: int) -> None:
        check_2d(dst, dst_offset, dst_pitch, src, src_offset, src_pitch, width, height)
        self.copies_2d += 1
        rows = np.lib.stride_tricks.as_strided(src.owner[src_offset:], (height, width), (src_pitch, 1)).copy()
        np.lib.stride_tricks.as_strided(dst.owner[dst_offset:], (height, width), (dst_pitch, 1))[:] = rows

    def synchronize(self) -> None:
        pass


class OrtContext:
    """TensorRT's ``IExecutionContext`` methods the backend calls, running an ONNX Runtime session on
    ``HostMemory`` addresses, with one optimization profile's shape ranges."""

    def __init__(self, session: ort.InferenceSession, memory: HostMemory,
                 profile: Mapping[str, Mapping[str, list[int]]]) -> None:
        self.session, self.memory, self.profile = session, memory, profile
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.calls: list[dict[str, tuple[int, ...]]] = []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        ranges = self.profile[name]
        if len(shape) != len(ranges["min"]) or not all(lo <= n <= hi for lo, n, hi in
                                                       zip(ranges["min"], shape, ranges["max"])):
            raise AssertionError(f"input {name} shape {tuple(shape)} outside the profile {ranges}")
        self.shapes[name] = tuple(int(n) for n in shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def _view(self, name: str, dtype: Any) -> np.ndarray:
        shape = self.shapes[name]
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if size == 0:
            return np.empty(shape, dtype)
        buffer = self.memory.buffers[self.addresses[name]]
        assert size <= buffer.size, f"{name} {shape} overruns its buffer"
        return np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(buffer.ctypes.data)).view(dtype).reshape(shape)

    def execute_async_v3(self, stream: int) -> bool:
        feeds = {i.name: self._view(i.name, _DTYPES[i.type]).copy() for i in self.session.get_inputs()}
        self.calls.append({name: value.shape for name, value in feeds.items()})
        for spec, value in zip(self.session.get_outputs(), self.session.run(None, feeds)):
            data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            buffer = self.memory.buffers[self.addresses[spec.name]]
            assert data.size <= buffer.size, f"output {spec.name} {value.shape} overruns its buffer"
            buffer[:data.size] = data
        return True


def _profile(bundle: Any, graph: str, name: str) -> Mapping[str, Any]:
    return next(p["shapes"] for p in bundle.manifest[schema.GRAPHS][graph][schema.PROFILES] if p["name"] == name)


def stand_in_engines(bundle_dir: str | Path, max_batch: int | None = None) -> TrtEngines:
    """Stand-ins for a trt-flavour bundle's engines; ``max_batch``: what their record says (default: the decode
    profile's batch)."""
    bundle = load_bundle(bundle_dir)
    memory = HostMemory()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = lambda graph: ort.InferenceSession(str(bundle.path(graph.file)), options,  # noqa: E731
                                                 providers=["CPUExecutionProvider"])
    decoder = session(bundle.decoder)
    decode = _profile(bundle, schema.DECODER, "decode")
    contexts = {name: OrtContext(decoder, memory, _profile(bundle, schema.DECODER, name))
                for name in ("prefill", "decode")}
    rows = decode[schema.INPUTS_EMBEDS]["max"][0] if max_batch is None else max_batch
    return TrtEngines(memory, OrtContext(session(bundle.vision), memory, _profile(bundle, schema.VISION, "image")),
                      contexts, rows)
