"""The CPU baseline: llama.cpp on the same checkpoint, converted by its own converter (bench-only).

``bash bench/llama_cpp_setup.sh CHECKPOINT DIR`` downloads llama.cpp's source (the copy vendored in the
``llama-cpp-python`` source package), builds ``llama-bench``, ``llama-mtmd-cli`` and ``llama-quantize``,
converts the checkpoint (``bench/llama_cpp_convert.py``) and quantizes it into ``DIR/gguf``. Nothing of
llama.cpp is a dependency of rexedge; ``rexedge bench --baseline llama.cpp --llama-cpp DIR`` runs the tools
as subprocesses.

Each run of a scenario is two commands, both with ``-t`` threads:

- ``llama-mtmd-cli``: the scenario's image (written as PNG) and task prompt in Rex-Omni's chat template
  (ChatML with the "You are a helpful assistant" system prompt), greedy with repetition penalty 1.05,
  ``--ignore-eos`` and ``-n`` = the forced answer's length, so it decodes as many tokens as rexedge. Its log
  gives the stages: the image encoded by the vision projector (vision), the prompt with its image tokens
  (prefill: llama.cpp's "prompt eval"), and the per-token decode ("eval"). Model loading is not counted
  (rexedge's runners are loaded once too); end to end is the sum of the three, which leaves out
  llama.cpp's image file decoding and sampling of the last token (a few ms), in its favour.
- ``llama-bench -p P -n N -r 1 -o json``: prompt tokens/s and decode ms/token as llama.cpp measures them
  (P = the prompt's length, N = the answer's), the figures llama.cpp users quote.

Peak RSS is the subprocess's own (``wait4``), the larger of the two.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rexedge.bench.runners import Run
from rexedge.bench.scenarios import BenchError, Scenario, forced_response
from rexedge.runtime.request.prompts import DEFAULT_SYSTEM_PROMPT, build_task_prompt
from rexedge.runtime.request.tokenizer import Tokenizer

BASELINE = "llama.cpp"
SETUP_SCRIPT = "bench/llama_cpp_setup.sh"
# rexedge's weight formats and the llama.cpp types of about the same bytes per weight
QUANT_FOR_WEIGHTS = {"float": "F16", "int8": "Q8_0", "int4": "Q4_K_M"}
MMPROJ_QUANT = "F16"
SOURCE_FILE = "source.json"       # written by the setup script: the checkpoint the GGUF files come from
REPETITION_PENALTY = 1.05
LLAMA_BENCH_PP, LLAMA_BENCH_TG = "llama_bench_pp_tokens_per_s", "llama_bench_tg_ms_per_token"   # metric names


@dataclass(frozen=True)
class LlamaCppDir:
    """What ``bench/llama_cpp_setup.sh`` leaves in its output directory."""

    root: Path

    @property
    def bench(self) -> Path:
        return self.root / "build" / "bin" / "llama-bench"

    @property
    def mtmd(self) -> Path:
        return self.root / "build" / "bin" / "llama-mtmd-cli"

    def gguf(self, quant: str) -> Path:
        return self.root / "gguf" / f"model-{quant}.gguf"

    @property
    def mmproj(self) -> Path:
        return self.root / "gguf" / f"mmproj-{MMPROJ_QUANT}.gguf"

    def check(self, quants: list[str], checkpoint: Path | None) -> None:
        """Every file the runs need is there, made from ``checkpoint``; else a BenchError naming the setup step."""
        needed = [self.bench, self.mtmd, self.mmproj, *(self.gguf(q) for q in quants)]
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise BenchError(f"--llama-cpp {self.root}: llama.cpp is not set up there (missing {', '.join(missing)}); "
                             f"make it with `bash {SETUP_SCRIPT} CHECKPOINT {self.root}` (bench-only: downloads, "
                             f"builds and converts)")
        if checkpoint is not None:
            source = json.loads((self.root / SOURCE_FILE).read_text(encoding="utf-8"))
            config = (checkpoint / "config.json").read_text(encoding="utf-8")
            if source.get("config_json") != json.loads(config):
                raise BenchError(f"--llama-cpp {self.root}: its GGUF files were converted from {source.get('checkpoint')}, "
                                 f"whose config.json differs from {checkpoint / 'config.json'}")


def bench_command(tools: LlamaCppDir, quant: str, prompt_tokens: int, new_tokens: int, threads: int,
                  repeats: int = 1) -> list[str]:
    """``llama-bench``: one prompt-processing test of ``prompt_tokens`` and one generation test of ``new_tokens``."""
    return [str(tools.bench), "-m", str(tools.gguf(quant)), "-t", str(threads), "-p", str(prompt_tokens),
            "-n", str(new_tokens), "-r", str(repeats), "-o", "json"]


def mtmd_command(tools: LlamaCppDir, quant: str, image: Path, prompt: str, new_tokens: int, threads: int,
                 context: int) -> list[str]:
    """``llama-mtmd-cli``: one request, greedy with the reference's repetition penalty, exactly ``new_tokens``."""
    return [str(tools.mtmd), "-m", str(tools.gguf(quant)), "--mmproj", str(tools.mmproj), "--image", str(image),
            "-p", prompt, "-sys", DEFAULT_SYSTEM_PROMPT, "--chat-template", "chatml", "-n", str(new_tokens),
            "--ignore-eos", "--temp", "0", "--repeat-penalty", str(REPETITION_PENALTY), "--repeat-last-n", "-1",
            "-t", str(threads), "-c", str(context), "--no-warmup"]


def parse_llama_bench(text: str) -> dict[str, float]:
    """``llama-bench -o json``'s prompt tokens/s and decode ms/token (medians of its samples)."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as err:
        raise BenchError(f"llama-bench printed no JSON ({err}): {text[:200]!r}") from None
    out = {}
    for test in tests:
        seconds = statistics.median(test["samples_ns"]) / 1e9
        if test["n_prompt"] and not test["n_gen"]:
            out["pp_tokens_per_s"] = test["n_prompt"] / seconds
        elif test["n_gen"] and not test["n_prompt"]:
            out["tg_ms_per_token"] = seconds / test["n_gen"] * 1e3
    if set(out) != {"pp_tokens_per_s", "tg_ms_per_token"}:
        raise BenchError(f"llama-bench's JSON lacks a prompt test or a generation test: {text[:200]!r}")
    return out


_MTMD_LINES = {  # key: the text just before the figure
    "image_encode_ms": "image slice encoded in ",
    "load_ms": "load time = ",
    "prompt_eval": "prompt eval time = ",
    "eval": "eval time = ",
}


def parse_mtmd_log(text: str) -> dict[str, float]:
    """The stages of one ``llama-mtmd-cli`` request from its log (llama.cpp's own timers).

    ``image_encode_ms`` (vision projector), ``prompt_ms`` / ``prompt_tokens`` (llama_perf's "prompt eval":
    the prompt's text and image tokens), ``eval_ms`` / ``eval_runs`` (one decode call per generated token).
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        for key, marker in _MTMD_LINES.items():
            at = line.find(marker)
            if at < 0 or (key == "eval" and "prompt eval" in line):
                continue
            numbers = line[at + len(marker):].replace("/", " ").split()
            if key in ("prompt_eval", "eval"):
                prefix = "prompt" if key == "prompt_eval" else "eval"
                out[f"{prefix}_ms"] = float(numbers[0])
                out[f"{prefix}_{'tokens' if key == 'prompt_eval' else 'runs'}"] = int(numbers[2])
            else:
                out[key] = float(numbers[0])
    missing = {"image_encode_ms", "prompt_ms", "prompt_tokens", "eval_ms", "eval_runs"} - set(out)
    if missing:
        raise BenchError(f"llama-mtmd-cli's log lacks {sorted(missing)} (did it fail?); its end: {text[-400:]!r}")
    return out


def run_tool(command: list[str]) -> tuple[str, str, int]:
    """Run a llama.cpp tool; its stdout, stderr and peak RSS in bytes (its own, from wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"{Path(command[0]).name} exited with status {proc.returncode}: {stderr[-600:]}")
    return stdout, stderr, usage.ru_maxrss * 1024


class LlamaCppRunner:
    """One llama.cpp quantization type, run as subprocesses per scenario (see the module docstring)."""

    def __init__(self, tools: LlamaCppDir, quant: str, tokenizer_dir: Path, threads: int) -> None:
        self.tools, self.quant, self.threads = tools, quant, threads
        self.name = f"{BASELINE}-{quant}"
        self.tokenizer = Tokenizer.from_dir(tokenizer_dir)
        self._images = tempfile.TemporaryDirectory(prefix="rexedge-llama-")

    def _image_file(self, scenario: Scenario, image: np.ndarray) -> Path:
        from PIL import Image

        path = Path(self._images.name) / f"{scenario.image_size[0]}x{scenario.image_size[1]}.png"
        if not path.is_file():
            Image.fromarray(image).save(path)
        return path

    def run(self, scenario: Scenario, image: np.ndarray) -> Run:
        new_tokens = len(forced_response(scenario, self.tokenizer))
        prompt = build_task_prompt(scenario.task, scenario.categories, None, None, scenario.image_size)
        context = 4096
        start = time.perf_counter()
        _, log, mtmd_rss = run_tool(mtmd_command(self.tools, self.quant, self._image_file(scenario, image), prompt,
                                                 new_tokens, self.threads, context))
        wall = time.perf_counter() - start
        stages = parse_mtmd_log(log)
        if stages["eval_runs"] != new_tokens:
            raise BenchError(f"llama-mtmd-cli decoded {stages['eval_runs']} tokens, {new_tokens} were asked")
        stdout, _, bench_rss = run_tool(bench_command(self.tools, self.quant, int(stages["prompt_tokens"]), new_tokens,
                                                      self.threads))
        measured = parse_llama_bench(stdout)
        vision, prefill, decode = (stages[k] / 1e3 for k in ("image_encode_ms", "prompt_ms", "eval_ms"))
        return Run(
            stages={"preprocess_s": None, "vision_s": vision, "prefill_s": prefill, "ttft_s": vision + prefill,
                    "decode_s": decode, "host_s": None, "end_to_end_s": vision + prefill + decode},
            output_tokens=new_tokens, boxes=scenario.num_boxes, prompt_tokens=int(stages["prompt_tokens"]),
            extra={LLAMA_BENCH_PP: measured["pp_tokens_per_s"], LLAMA_BENCH_TG: measured["tg_ms_per_token"],
                   "process_wall_s": wall, "load_s": stages.get("load_ms", 0.0) / 1e3},
            process_rss_bytes=max(mtmd_rss, bench_rss))
