"""One timed inference of a scenario on a rexedge backend, through the public API.

``RexedgeRunner`` holds a ``RexOmni`` (the public API, so preprocessing, prompt, vision,
prefill, the decode loop, text decoding and parsing are the ones users run) and runs each
scenario through ``RexOmni.run`` with a decode loop of its own around a ``ScriptedHead`` and a
``TimedBackend`` (``rexedge.bench.scripted``): the answer is forced, everything else is real.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rexedge.bench.metrics import ByteModel
from rexedge.bench.scenarios import BenchError, Scenario, forced_response
from rexedge.bench.scripted import ScriptedHead, StepRecord, TimedBackend
from rexedge.runtime import manifest as schema
from rexedge.runtime.decode.head import Sampling
from rexedge.runtime.decode.loop import DecodeLoop, Limits
from rexedge.runtime.results.result import Result

STAGES = ("preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_s", "host_s", "end_to_end_s")


@dataclass
class Run:
    """Seconds per stage of one inference (``host_s``: decode time outside the backend, None if unknown;
    a stage a runner cannot see, None)."""

    stages: dict[str, float | None]
    output_tokens: int
    boxes: int
    prompt_tokens: int
    steps: list[StepRecord] = field(default_factory=list)
    peak_gpu_bytes: int | None = None
    extra: dict[str, float] = field(default_factory=dict)   # a runner's own figures (llama-bench's), as measured
    process_rss_bytes: int | None = None                     # peak RSS of the subprocess that ran it, if any


class RexedgeRunner:
    """A rexedge backend (``ort``, ``torch``, ...) behind ``RexOmni``, forced to each scenario's answer."""

    def __init__(self, backend: str, model_path: Path, device: str, max_context: int,
                 options: dict[str, Any] | None = None) -> None:
        from rexedge.runtime.api import RexOmni

        self.name = backend
        self.device = device
        self.model = RexOmni(model_path, backend=backend, device=device, max_context=max_context, **(options or {}))
        self.config = self.model.config
        self.tokenizer = self.model.tokenizer
        self.byte_model = self._byte_model((options or {}).get("dtype", "float32"))
        self._scripts: dict[str, list[int]] = {}

    def _byte_model(self, dtype: str) -> ByteModel:
        backend = self.model.backend
        bundle = getattr(backend, "bundle", None)
        head_bytes = backend.embed_table.dtype.itemsize
        if bundle is not None:  # exported graphs: the decoder's weight file is exactly what a step reads
            weight_bytes = bundle.manifest[schema.FILES][bundle.decoder.data]["bytes"]
            value_bytes = 2 if bundle.precision == "fp16" else 4
            head_graph = bundle.head_graph
            full_head = None if head_graph is None else bundle.manifest[schema.FILES][head_graph[schema.DATA]]["bytes"]
            return ByteModel(self.config, weight_bytes, value_bytes, head_bytes, full_head)
        from rexedge.bench.metrics import decoder_weight_count

        value_bytes = 4 if dtype in ("float32", "fp32") else 2
        return ByteModel(self.config, decoder_weight_count(self.config) * value_bytes, value_bytes, head_bytes)

    def script(self, scenario: Scenario) -> list[int]:
        if scenario.name not in self._scripts:
            self._scripts[scenario.name] = forced_response(scenario, self.tokenizer)
        return self._scripts[scenario.name]

    def run(self, scenario: Scenario, image: np.ndarray) -> Run:
        script = self.script(scenario)
        head = ScriptedHead(self.model.backend.make_head(Sampling()), script)
        timed = TimedBackend(self.model.backend, head)
        loop = DecodeLoop(timed, head, self.model.ids, mode=scenario.decoding,
                          limits=Limits(max_new_tokens=len(script)))
        gpu = GpuPeak(self.device)
        prepared = self.model.prepare(image, task=scenario.task, categories=scenario.categories)
        result = Result.from_official(self.model.run(prepared, loop=loop))
        if result.output_token_ids != script or result.stop_reason != "eos" \
                or len(result.detections) != scenario.num_boxes:
            raise BenchError(f"{self.name}: scenario {scenario.name} did not decode its forced answer (stop "
                             f"{result.stop_reason}, {len(result.detections)}/{scenario.num_boxes} items)")
        t = result.timings
        return Run(
            stages={"preprocess_s": t.preprocess_s, "vision_s": t.vision_s, "prefill_s": t.prefill_s,
                    "ttft_s": t.preprocess_s + t.vision_s + t.prefill_s, "decode_s": t.decode_s,
                    "host_s": t.decode_s - t.decode_backend_s, "end_to_end_s": result.inference_time},
            output_tokens=len(script), boxes=len(result.detections), prompt_tokens=result.num_prompt_tokens,
            steps=timed.records, peak_gpu_bytes=gpu.peak())


class GpuPeak:
    """Peak CUDA memory allocated through torch during a run (None on the CPU, or without torch in use)."""

    def __init__(self, device: str) -> None:
        torch = sys.modules.get("torch")
        self._torch = torch if device.startswith("cuda") and torch is not None and torch.cuda.is_available() else None
        if self._torch is not None:
            self._torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        if self._torch is None:
            return None
        self._torch.cuda.synchronize()
        return int(self._torch.cuda.max_memory_allocated()) or None
