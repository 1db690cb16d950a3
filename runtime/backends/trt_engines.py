"""Finding a bundle's TensorRT engines for this machine (what the trt backend needs at load).

An engine runs only on the GPU model and TensorRT version it was built with; engines are named
by what they depend on and recorded in the manifest's ``engines`` (see
:mod:`rexedge.export.tensorrt.engine`, which builds them). :func:`select_engines` finds the
record for this machine, or says what the bundle holds and what this machine is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from rexedge.runtime import manifest as schema
from rexedge.runtime.bundle import Bundle
from rexedge.runtime.errors import RexEdgeError

ENGINE_PRECISIONS = ("fp16", "int8")
GRAPHS = (schema.VISION, schema.DECODER)
TENSORRT_INSTALL_HINT = ("pip install rexedge[tensorrt] (tensorrt + cuda-python); on a Jetson, TensorRT comes with "
                         "JetPack 6 as the python3-libnvinfer package (sudo apt install python3-libnvinfer)")


class EngineError(RexEdgeError, ValueError):
    """Engines that cannot be built, or that do not fit this machine."""


@dataclass(frozen=True)
class Target:
    """What an engine depends on: the GPU model, its compute capability and the TensorRT version."""

    gpu: str
    compute_capability: tuple[int, int]
    tensorrt: str

    @property
    def slug(self) -> str:
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-") or "gpu"
        major, minor = self.compute_capability
        return f"{gpu}.sm{major}{minor}.trt{self.tensorrt}"

    def describe(self) -> str:
        major, minor = self.compute_capability
        return f"{self.gpu} (compute capability {major}.{minor}) with TensorRT {self.tensorrt}"


def engine_file(graph: str, target: Target, precision: str) -> str:
    return f"{graph}.{target.slug}.{precision}.engine"


# an engine record's most rows per decode call (its decode profile's batch); records written before batched
# decoding have none and were built for one row
MAX_BATCH_KEY = "max_batch"


def engine_record(target: Target, precision: str, profiles: Mapping[str, list[str]],
                  settings: Mapping[str, Any], max_batch: int = 1) -> dict[str, Any]:
    """The manifest entry of one target's engines (see the module docstring); ``max_batch``: the most rows
    the decoder engine's decode profile takes."""
    return {"gpu": target.gpu, "compute_capability": list(target.compute_capability), "tensorrt": target.tensorrt,
            schema.PRECISION: precision, schema.FILES: {g: engine_file(g, target, precision) for g in GRAPHS},
            schema.PROFILES: {g: list(names) for g, names in profiles.items()}, "settings": dict(settings),
            MAX_BATCH_KEY: max_batch}


def record_max_batch(record: Mapping[str, Any]) -> int:
    """The most rows one decode call of a record's decoder engine takes (1 for records before batching)."""
    return int(record.get(MAX_BATCH_KEY, 1))


def record_target(record: Mapping[str, Any]) -> Target:
    return Target(record["gpu"], tuple(record["compute_capability"]), record["tensorrt"])


def select_engines(bundle: Bundle, target: Target, precision: str) -> Mapping[str, Any]:
    """The engine record of ``bundle`` for ``target`` and ``precision``; EngineError saying what is there if none."""
    records = [r for r in bundle.manifest.get(schema.ENGINES, []) if r[schema.PRECISION] == precision]
    for record in records:
        if record_target(record) == target:
            return record
    build = f"build them here with `rexedge build {bundle.directory} --precision {precision}`"
    if not records:
        raise EngineError(f"{bundle.directory}: no {precision} TensorRT engines in this bundle; {build}")
    built = "; ".join(record_target(r).describe() for r in records)
    raise EngineError(
        f"{bundle.directory}: its {precision} engines were built for {built}, and this machine has "
        f"{target.describe()}. A TensorRT engine runs only on the GPU model and TensorRT version it was built "
        f"with; {build}")


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or an EngineError saying what to install."""
    try:
        import tensorrt
    except ImportError as e:
        raise EngineError(f"TensorRT is not installed ({e}); {TENSORRT_INSTALL_HINT}") from None
    return tensorrt


def current_target(trt: Any, device: Any) -> Target:
    """This machine's target: ``device`` is a :class:`rexedge.runtime.backends.cuda_memory.CudaMemory`."""
    info = device.device_info()
    return Target(info.name, info.compute_capability, trt.__version__)
