"""Statistics, memory and the hardware floor the benchmark reports against.

- ``summary``: median and p90 of repeated measurements (after warm-up; the harness drops those).
- ``PeakRss``: the process's resident peak over a stretch of code, through Linux's
  resettable high-water mark (write "5" to /proc/self/clear_refs, read VmHWM).
- ``host_read_bandwidth``: what a plain streaming read reaches on this machine (numpy sums
  over a buffer far larger than the caches, one thread per core), measured in the same run.
- ``step_bytes``: bytes one decode step must read: the decoder weights, the cached keys and
  values attention looks at, and the head rows the step's choice multiplies.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rexedge.runtime.config import RexOmniConfig

# Nominal memory bandwidth in GB/s of devices a benchmark may run on (docs/model.md), by a
# lower-case substring of the device name.
NOMINAL_BANDWIDTH_GBS = {
    "h200": 4800.0,
    "h100": 3350.0,
    "agx orin": 204.8,
    "orin nx": 102.4,
    "orin nano": 68.0,
}


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """Median and 90th percentile (linear interpolation) of ``values``."""
    if not values:
        raise ValueError("summary of no values")
    return {"median": float(statistics.median(values)), "p90": float(np.percentile(values, 90)), "n": len(values)}


class PeakRss:
    """Peak resident set size (bytes) between ``reset()`` and ``peak()``; Linux only."""

    STATUS = "/proc/self/status"

    @staticmethod
    def _status(field: str) -> int:
        with open(PeakRss.STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
        raise OSError(f"{PeakRss.STATUS} has no {field}")

    @classmethod
    def available(cls) -> bool:
        return os.path.exists("/proc/self/clear_refs") and os.path.exists(cls.STATUS)

    @classmethod
    def current(cls) -> int:
        return cls._status("VmRSS")

    @classmethod
    def reset(cls) -> None:
        """Set the high-water mark to the current RSS (Linux >= 4.0)."""
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @classmethod
    def peak(cls) -> int:
        return cls._status("VmHWM")


def host_read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Median GB/s of summing a float32 buffer of ``megabytes``, one slice per core at once.

    One thread alone does not saturate the memory system (on the 2-core development
    machine it reads ~18 GB/s, two read ~40); numpy's sum releases the GIL, so threads do."""
    buffer = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    slices = np.array_split(buffer, os.cpu_count() or 1)
    with ThreadPoolExecutor(len(slices)) as pool:
        list(pool.map(np.sum, slices))  # fault the pages in and start the threads before timing
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, slices))
            times.append(time.perf_counter() - start)
    return buffer.nbytes / statistics.median(times) / 1e9


def nominal_bandwidth(device_name: str) -> float | None:
    lowered = device_name.lower()
    return next((gbs for key, gbs in NOMINAL_BANDWIDTH_GBS.items() if key in lowered), None)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decoder_weight_count(cfg: RexOmniConfig) -> int:
    """Parameters a decode step reads besides the head: every text layer and the final norm."""
    from rexedge.runtime.model.checkpoint import EMBED, HEAD, expected_tensor_shapes

    return sum(math.prod(shape) for name, shape in expected_tensor_shapes(cfg).items()
               if not name.startswith("visual.") and name not in (EMBED, HEAD))


@dataclass(frozen=True)
class ByteModel:
    """What a decode step reads, for one backend's storage."""

    cfg: RexOmniConfig
    decoder_weight_bytes: int     # every text layer and the final norm, as the backend stores them
    kv_bytes_per_value: int       # KV cache element
    head_bytes_per_value: int     # head table element
    full_head_bytes: int | None = None   # a weight-quantized bundle's head graph, which full-vocabulary steps read

    def step_bytes(self, context: float, head_rows: int) -> float:
        """Weights + the keys/values of ``context`` cached tokens + ``head_rows`` rows of the head."""
        cfg = self.cfg
        kv = context * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * self.kv_bytes_per_value
        if head_rows == cfg.vocab_size and self.full_head_bytes is not None:
            return self.decoder_weight_bytes + kv + self.full_head_bytes
        return self.decoder_weight_bytes + kv + head_rows * cfg.hidden_size * self.head_bytes_per_value
