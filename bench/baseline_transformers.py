"""The baseline: transformers ``generate`` on the same checkpoint and inputs.

The official Rex-Omni wrapper's transformers path: the Qwen2-VL image processor,
``Qwen2_5_VLForConditionalGeneration.generate`` greedy with repetition penalty 1.05, then
decoding and parsing the text. Processor-free on the text side: the prompt ids come from
rexedge's tokenizer (the same ids the wrapper's processor gives), the image goes through
transformers' own (PIL) Qwen2-VL image processor, which is timed as preprocessing. The
answer length is forced with ``min_new_tokens == max_new_tokens`` = the scenario's
length, so both sides decode the same number of tokens (the values differ: random weights).

Stages are timed from inside ``generate``: forward hooks around the vision tower, and a
logits processor that stamps each token's logits (the first stamp is the time to first
token; the gaps between stamps are the per-token steps).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from rexedge.bench.metrics import ByteModel
from rexedge.bench.runners import Run, GpuPeak
from rexedge.bench.scenarios import BenchError, Scenario, forced_response
from rexedge.bench.scripted import StepRecord
from rexedge.runtime.results.parse import parse_prediction
from rexedge.runtime.request.preprocess import MAX_PIXELS, MIN_PIXELS, load_image
from rexedge.runtime.request.prompts import build_task_prompt, encode_prompt
from rexedge.runtime.request.tokenizer import Tokenizer

BASELINE = "transformers"
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TransformersRunner:
    name = BASELINE

    def __init__(self, checkpoint: Path, device: str, precision: str = "fp32") -> None:
        import torch
        import transformers
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

        transformers.logging.set_verbosity_error()
        self._torch = torch
        self.device = device
        dtype = getattr(torch, _TORCH_DTYPES[precision])
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).eval().to(device)
        self.processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        self.tokenizer = Tokenizer.from_dir(checkpoint)
        self.ids = self.tokenizer.ids
        from rexedge.runtime.config import RexOmniConfig

        self.config = RexOmniConfig.from_json(checkpoint)
        decoder_bytes = sum(p.numel() * p.element_size() for name, p in self.model.named_parameters()
                            if "visual" not in name and "embed_tokens" not in name and "lm_head" not in name)
        value_bytes = torch.finfo(dtype).bits // 8
        self.byte_model = ByteModel(self.config, decoder_bytes, value_bytes, value_bytes)
        self._vision_times: list[float] = []
        visual = self.model.model.visual
        visual.register_forward_pre_hook(lambda module, args: self._stamp(self._vision_times))
        visual.register_forward_hook(lambda module, args, output: self._stamp(self._vision_times))

    def _stamp(self, into: list[float]) -> None:
        if self.device.startswith("cuda"):
            self._torch.cuda.synchronize()
        into.append(time.perf_counter())

    def run(self, scenario: Scenario, image: np.ndarray) -> Run:
        from transformers import LogitsProcessor, LogitsProcessorList

        torch, ids = self._torch, self.ids
        new_tokens = len(forced_response(scenario, self.tokenizer))
        stamps: list[float] = []
        runner = self

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                runner._stamp(stamps)
                return scores

        self._vision_times.clear()
        gpu = GpuPeak(self.device)
        t0 = time.perf_counter()
        pil = load_image(image)
        pixels = self.processor(images=[pil], return_tensors="pt")
        grid = pixels["image_grid_thw"]
        width, height = pil.size
        task_prompt = build_task_prompt(scenario.task, scenario.categories, None, None, (width, height))
        num_image_tokens = int(grid.prod()) // self.config.merge_unit
        input_ids = torch.tensor([encode_prompt(self.tokenizer, ids, task_prompt, num_image_tokens)], device=self.device)
        pixel_values = pixels["pixel_values"].to(self.device, self.model.dtype)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                image_grid_thw=grid.to(self.device), mm_token_type_ids=(input_ids == ids.image_pad).int(),
                do_sample=False, repetition_penalty=1.05, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                eos_token_id=[ids.im_end, ids.endoftext], pad_token_id=ids.endoftext,
                logits_processor=LogitsProcessorList([Stamp()]))
        self._stamp(stamps)
        generated = out[0, input_ids.shape[1]:].tolist()
        if len(generated) != new_tokens:
            raise BenchError(f"transformers generated {len(generated)} tokens, {new_tokens} were forced")
        parse_prediction(self.tokenizer.decode(generated), width, height, scenario.task)
        t_end = time.perf_counter()

        vision_start, vision_end = self._vision_times[:2]
        first, last = stamps[0], stamps[-1]
        prompt_tokens = input_ids.shape[1]
        # gaps between logits stamps: choosing token i and the forward pass that gives token i + 1
        steps = [StepRecord("full", 1, 0.0, b - a, prompt_tokens + i) for i, (a, b) in enumerate(zip(stamps, stamps[1:-1]))]
        return Run(
            stages={"preprocess_s": t1 - t0, "vision_s": vision_end - vision_start, "prefill_s": first - vision_end,
                    "ttft_s": first - t0, "decode_s": last - first, "host_s": None, "end_to_end_s": t_end - t0},
            # the same number of items as the forced answer: the tokens decoded are as many
            output_tokens=len(generated), boxes=scenario.num_boxes, prompt_tokens=prompt_tokens, steps=steps,
            peak_gpu_bytes=gpu.peak())
