"""Backends run the model; ``load_backend`` picks one by name, explicitly (no fallback).

- ``ort``: a bundle's ONNX graphs on ONNX Runtime (CPU; CUDA with onnxruntime-gpu).
- ``torch``: the compact torch model loaded from a checkpoint directory (CPU reference;
  on ``device="cuda"`` the Triton kernels and CUDA graphs, see ``DEVICE_VARIANTS``).
- ``trt``: a trt-flavour bundle's TensorRT engines built by ``rexedge build`` (CUDA).

Backend modules are imported only when chosen, so using ``ort`` never imports torch.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from rexedge.runtime.backends.base import DEFAULT_MAX_CONTEXT, Backend, BackendError

__all__ = ["BACKENDS", "Backend", "BackendError", "DEFAULT_MAX_CONTEXT", "load_backend"]

# name -> (module, class, what model_path is)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "ort": ("rexedge.runtime.backends.ort", "OrtBackend", "a bundle directory (rexedge export)"),
    "torch": ("rexedge.runtime.backends.torch_cpu", "TorchBackend", "a checkpoint directory"),
    "trt": ("rexedge.runtime.backends.trt", "TrtBackend", "a trt-flavour bundle with engines (rexedge build)"),
}

# (name, device kind) -> (module, class) where a backend has a separate class for that kind of device
DEVICE_VARIANTS: dict[tuple[str, str], tuple[str, str]] = {
    ("torch", "cuda"): ("rexedge.runtime.backends.torch_cuda", "TorchCudaBackend"),
}


def load_backend(name: str, model_path: str | Path, device: str = "cpu", **options: Any) -> Backend:
    """Create backend ``name`` for ``model_path`` on ``device``; ``options`` go to its constructor
    (e.g. ``max_context``)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}")
    module_name, class_name, _ = BACKENDS[name]
    module_name, class_name = DEVICE_VARIANTS.get((name, device.split(":")[0]), (module_name, class_name))
    cls = getattr(importlib.import_module(module_name), class_name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model_path", "device")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BackendError(f"backend {name!r} does not take option(s) {', '.join(unknown)}; "
                           f"it takes {', '.join(accepted)}")
    return cls(model_path, device=device, **options)
