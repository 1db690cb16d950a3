"""One image's result, typed: what ``RexOmni.run`` builds, and the two forms it is handed out in.

``to_official()`` is the dictionary ``RexOmni.inference`` returns: the official wrapper's keys
(``success``, ``image_size``, ``resized_size``, ``task``, ``prompt``, ``raw_output``,
``extracted_predictions``, ``inference_time``, ``num_output_tokens``, ``num_prompt_tokens``,
``generation_time``, ``tokens_per_second``) plus rexedge's (``output_token_ids``, ``detections``,
``absent``, ``stop_reason``, ``padding_tokens``, ``timings``). ``to_json()`` is what a line of
``rexedge batch`` / ``rexedge video`` / ``rexedge detect --json`` holds: the same less the token
ids, detections as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from rexedge.runtime.results.detections import Detection, detections_to_json


@dataclass(frozen=True)
class Timings:
    """Seconds per stage of one request; ``steps``: backend steps by kind (``Generation.steps``)."""

    preprocess_s: float
    vision_s: float
    prefill_s: float
    decode_s: float
    decode_backend_s: float
    steps: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"preprocess_s": self.preprocess_s, "vision_s": self.vision_s, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "decode_backend_s": self.decode_backend_s,
                "decode_host_s": self.decode_s - self.decode_backend_s, "steps": self.steps}


@dataclass(frozen=True)
class Result:
    task: str
    image_size: tuple[int, int]
    resized_size: tuple[int, int]
    prompt: str
    raw_output: str
    extracted_predictions: dict[str, Any]   # the official parser's dictionary
    inference_time: float                   # seconds: preprocessing, vision, prefill and decode
    output_token_ids: list[int]
    num_prompt_tokens: int
    detections: list[Detection]
    absent: list[str]                       # phrases answered "None"
    stop_reason: str
    padding_tokens: int                     # output ids without text (the embedding's padding rows)
    timings: Timings

    @classmethod
    def from_official(cls, result: Mapping[str, Any]) -> Result:
        """Back from a ``to_official()`` dictionary (what ``RexOmni.run`` and ``inference`` hand out)."""
        t = result["timings"]
        timings = Timings(preprocess_s=t["preprocess_s"], vision_s=t["vision_s"], prefill_s=t["prefill_s"],
                          decode_s=t["decode_s"], decode_backend_s=t["decode_backend_s"], steps=t["steps"])
        return cls(task=result["task"], image_size=result["image_size"], resized_size=result["resized_size"],
                   prompt=result["prompt"], raw_output=result["raw_output"],
                   extracted_predictions=result["extracted_predictions"], inference_time=result["inference_time"],
                   output_token_ids=result["output_token_ids"], num_prompt_tokens=result["num_prompt_tokens"],
                   detections=result["detections"], absent=result["absent"], stop_reason=result["stop_reason"],
                   padding_tokens=result["padding_tokens"], timings=timings)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def generation_time(self) -> float:
        return self.timings.prefill_s + self.timings.decode_s

    @property
    def tokens_per_second(self) -> float:
        decode_s = self.timings.decode_s
        return self.num_output_tokens / decode_s if decode_s > 0 else 0.0

    @property
    def drawable(self) -> Any:
        """What to draw: keypoint answers are parsed from the text (the official dictionary); every other
        task has typed detections with scores."""
        return self.extracted_predictions if self.task == "keypoint" else self.detections

    def _fields(self) -> dict[str, Any]:
        """Every field but the token ids and detections, in the order the JSON lines have them."""
        return {"success": True, "task": self.task, "image_size": self.image_size,
                "resized_size": self.resized_size, "prompt": self.prompt, "raw_output": self.raw_output,
                "extracted_predictions": self.extracted_predictions, "inference_time": self.inference_time,
                "num_output_tokens": self.num_output_tokens, "num_prompt_tokens": self.num_prompt_tokens,
                "generation_time": self.generation_time, "tokens_per_second": self.tokens_per_second,
                "absent": self.absent, "stop_reason": self.stop_reason, "padding_tokens": self.padding_tokens,
                "timings": self.timings.to_dict()}

    def to_official(self) -> dict[str, Any]:
        """The ``RexOmni.inference`` dictionary (see the module docstring)."""
        fields = self._fields()
        official = ("success", "image_size", "resized_size", "task", "prompt", "raw_output", "extracted_predictions",
                    "inference_time", "num_output_tokens", "num_prompt_tokens", "generation_time",
                    "tokens_per_second")
        return {**{key: fields[key] for key in official}, "output_token_ids": self.output_token_ids,
                "detections": self.detections, "absent": self.absent, "stop_reason": self.stop_reason,
                "padding_tokens": self.padding_tokens, "timings": fields["timings"]}

    def to_json(self) -> dict[str, Any]:
        """The JSON-serialisable fields of an output line (no token ids; detections as JSON)."""
        return {**self._fields(), "detections": detections_to_json(self.detections)}
