"""Device memory, pinned host memory and one stream, for the trt backend and engine building.

Two providers behind one small interface, chosen by what is installed:

- ``torch`` when torch with CUDA is installed: buffers are torch tensors (so the Triton
  head can read the decoder's hidden state in place, without a copy), the stream is a
  ``torch.cuda.Stream`` whose handle TensorRT enqueues on.
- ``cuda-python`` otherwise (``cudart``: cudaMalloc, cudaMallocHost, cudaMemcpyAsync,
  cudaStreamCreate): the torch-free path, so a Jetson install needs no torch.

Why cuda-python rather than pycuda for the torch-free path: cuda-python is NVIDIA's own
binding, versioned with the CUDA toolkit and used by TensorRT 10's own Python samples; it
installs from a wheel with no compiler, whereas pycuda builds a C++ extension against the
local CUDA at install time (slow and fragile on Jetson) and creates its own CUDA context
(``pycuda.autoinit``), which then has to be shared with TensorRT's. cuda-python works on
the primary context that TensorRT and torch use too.

All copies are asynchronous on the provider's stream; :meth:`synchronize` waits for them.
"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rexedge.runtime.backends.base import BackendError

INSTALL_HINT = ("pip install rexedge[tensorrt] (tensorrt + cuda-python); on a Jetson the JetPack provides "
                "TensorRT as python3-libnvinfer (apt) and cuda-python comes from pip")


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: tuple[int, int]
    total_memory: int  # bytes


@dataclass
class DeviceBuffer:
    """``nbytes`` of device memory at ``ptr``; ``owner`` keeps the allocation alive (a torch tensor, or None)."""

    ptr: int
    nbytes: int
    owner: Any = None


class CudaMemory(Protocol):
    provider: str
    stream_handle: int  # what IExecutionContext.execute_async_v3 takes

    def device_info(self) -> DeviceInfo: ...
    def alloc(self, nbytes: int) -> DeviceBuffer: ...
    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray: ...
    def to_device(self, dst: DeviceBuffer, src: np.ndarray, offset: int = 0) -> None: ...
    def to_host(self, dst: np.ndarray, src: DeviceBuffer, offset: int = 0) -> None: ...
    def copy_2d(self, dst: DeviceBuffer, dst_offset: int, dst_pitch: int, src: DeviceBuffer, src_offset: int,
                src_pitch: int, width: int, height: int) -> None:
        """Device to device: ``height`` rows of ``width`` bytes, row r from ``src_offset + r * src_pitch`` to
        ``dst_offset + r * dst_pitch`` (the two regions must not overlap)."""
        ...
    def synchronize(self) -> None: ...


def _check_fits(buffer: DeviceBuffer, offset: int, nbytes: int) -> None:
    if offset < 0 or offset + nbytes > buffer.nbytes:
        raise BackendError(f"device copy of {nbytes} bytes at offset {offset} does not fit a {buffer.nbytes}-byte "
                           f"buffer")


def check_2d(dst: DeviceBuffer, dst_offset: int, dst_pitch: int, src: DeviceBuffer, src_offset: int, src_pitch: int,
             width: int, height: int) -> None:
    """A 2-D copy's rows fit both buffers (see ``CudaMemory.copy_2d``)."""
    if width > min(dst_pitch, src_pitch) or height < 1:
        raise BackendError(f"2-D device copy: rows of {width} bytes need pitches at least that wide and one row or "
                           f"more, got pitches {dst_pitch} / {src_pitch} and {height} rows")
    _check_fits(dst, dst_offset, (height - 1) * dst_pitch + width)
    _check_fits(src, src_offset, (height - 1) * src_pitch + width)


class TorchMemory:
    """Buffers as uint8 torch tensors on ``cuda:index``; copies through ``Tensor.copy_`` on a side stream."""

    provider = "torch"

    def __init__(self, index: int) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(self.device)
        self.stream_handle = int(self.stream.cuda_stream)

    def device_info(self) -> DeviceInfo:
        props = self.torch.cuda.get_device_properties(self.device)
        return DeviceInfo(props.name, (props.major, props.minor), int(props.total_memory))

    def alloc(self, nbytes: int) -> DeviceBuffer:
        tensor = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device=self.device)
        return DeviceBuffer(int(tensor.data_ptr()), nbytes, tensor)

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.torch.empty(count, dtype=self.torch.uint8, pin_memory=True).numpy().view(dtype).reshape(shape)

    def _bytes(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(np.uint8))

    def to_device(self, dst: DeviceBuffer, src: np.ndarray, offset: int = 0) -> None:
        _check_fits(dst, offset, src.nbytes)
        with self.torch.cuda.stream(self.stream):
            dst.owner[offset:offset + src.nbytes].copy_(self._bytes(src), non_blocking=True)

    def to_host(self, dst: np.ndarray, src: DeviceBuffer, offset: int = 0) -> None:
        _check_fits(src, offset, dst.nbytes)
        if not dst.flags.c_contiguous:
            raise BackendError("to_host needs a contiguous destination array")
        with self.torch.cuda.stream(self.stream):
            self._bytes(dst).copy_(src.owner[offset:offset + dst.nbytes], non_blocking=True)

    def copy_2d(self, dst: DeviceBuffer, dst_offset: int, dst_pitch: int, src: DeviceBuffer, src_offset: int,
                src_pitch: int, width: int, height: int) -> None:
        check_2d(dst, dst_offset, dst_pitch, src, src_offset, src_pitch, width, height)
        with self.torch.cuda.stream(self.stream):
            target = dst.owner.as_strided((height, width), (dst_pitch, 1), dst_offset)
            target.copy_(src.owner.as_strided((height, width), (src_pitch, 1), src_offset), non_blocking=True)

    def synchronize(self) -> None:
        self.stream.synchronize()


def _cudart() -> Any:
    try:  # cuda-python >= 12.6 names the module cuda.bindings.runtime; older releases cuda.cudart
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


class CudaPythonMemory:
    """cudaMalloc / cudaMallocHost / cudaMemcpyAsync on one cudaStream through cuda-python's ``cudart``."""

    provider = "cuda-python"

    def __init__(self, index: int) -> None:
        self._rt = _cudart()
        self._index = index
        self._call(self._rt.cudaSetDevice(index))
        self._stream = self._call(self._rt.cudaStreamCreate())
        self.stream_handle = int(self._stream)
        self._allocations: list[int] = []
        self._host: list[int] = []

    def _call(self, result: Any) -> Any:
        """cudart calls return (error, value...); raise on an error, return the value(s)."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._rt.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA runtime error {err!r}")
        return values[0] if len(values) == 1 else (values or None)

    def device_info(self) -> DeviceInfo:
        props = self._call(self._rt.cudaGetDeviceProperties(self._index))
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return DeviceInfo(name.rstrip("\x00"), (int(props.major), int(props.minor)), int(props.totalGlobalMem))

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = int(self._call(self._rt.cudaMalloc(max(nbytes, 1))))
        self._allocations.append(ptr)
        return DeviceBuffer(ptr, nbytes)

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        ptr = int(self._call(self._rt.cudaMallocHost(max(count * dtype.itemsize, 1))))
        self._host.append(ptr)
        raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr)
        return np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)

    def to_device(self, dst: DeviceBuffer, src: np.ndarray, offset: int = 0) -> None:
        _check_fits(dst, offset, src.nbytes)
        src = np.ascontiguousarray(src)
        self._call(self._rt.cudaMemcpyAsync(dst.ptr + offset, src.ctypes.data, src.nbytes,
                                            self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))

    def to_host(self, dst: np.ndarray, src: DeviceBuffer, offset: int = 0) -> None:
        _check_fits(src, offset, dst.nbytes)
        if not dst.flags.c_contiguous:
            raise BackendError("to_host needs a contiguous destination array")
        self._call(self._rt.cudaMemcpyAsync(dst.ctypes.data, src.ptr + offset, dst.nbytes,
                                            self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))

    def copy_2d(self, dst: DeviceBuffer, dst_offset: int, dst_pitch: int, src: DeviceBuffer, src_offset: int,
                src_pitch: int, width: int, height: int) -> None:
        check_2d(dst, dst_offset, dst_pitch, src, src_offset, src_pitch, width, height)
        self._call(self._rt.cudaMemcpy2DAsync(dst.ptr + dst_offset, dst_pitch, src.ptr + src_offset, src_pitch, width,
                                              height, self._rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream))

    def synchronize(self) -> None:
        self._call(self._rt.cudaStreamSynchronize(self._stream))

    def __del__(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        for ptr in getattr(self, "_allocations", ()):
            rt.cudaFree(ptr)
        for ptr in getattr(self, "_host", ()):
            rt.cudaFreeHost(ptr)


def parse_cuda_device(device: str, who: str) -> int:
    """'cuda' or 'cuda:N' -> N; anything else is a BackendError naming ``who``."""
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise BackendError(f"{who}: device {device!r} is not a CUDA device; expected 'cuda' or 'cuda:N'")
    return int(index or 0)


def _torch_has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def open_cuda(index: int = 0) -> CudaMemory:
    """The memory provider for CUDA device ``index``: torch when it is installed with CUDA, else cuda-python."""
    if _torch_has_cuda():
        return TorchMemory(index)
    if importlib.util.find_spec("cuda") is None:
        raise BackendError(f"no CUDA memory provider: neither torch with CUDA nor cuda-python is installed; "
                           f"{INSTALL_HINT}")
    return CudaPythonMemory(index)
