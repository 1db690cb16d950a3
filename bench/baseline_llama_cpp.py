"""The CPU baseline: llama.cpp on the same checkpoint, converted by its own converter (bench-only).

``bash bench/llama_cpp_setup.sh CHECKPOINT DIR`` downloads llama.cpp's source (the copy vendored in the
``llama-cpp-python`` source package), builds ``llama-bench``, ``llama-mtmd-cli`` and ``llama-quantize``,
converts the checkpoint (``bench/llama_cpp_convert.py``) and quantizes it into ``DIR/gguf``. Nothing of
llama.cpp is a dependency of rexedge; ``rexedge bench --baseline llama.cpp --llama-cpp DIR`` runs the tools
as subprocesses.

Each run of a scenario is two commands, both with ``-t`` threads:

- ``llama-mtmd-cli``: the scenario's image (written as PNG) and task prompt in Rex-Omni's chat template
  (ChatML with the "You are a helpful assistant" system prompt), greedy with repetition penalty 1.05,
  ``--ignore-eos`` and ``-n`` = the forced answer's length, so it decodes as many tokens as rexedge. From its
  log (``-lv 4 --log-timestamps``): end to end = the request after both models are loaded (image file
  decoding, prompt, vision, prefill, decode), vision = the projector's image encode, decode = llama_perf's
  single-token decode calls ("eval"), prefill = the rest (the prompt's text and image tokens through the
  decoder, sampling), TTFT = end to end - decode. Model loading is not counted (rexedge's runners are
  loaded once too).
- ``llama-bench -p P -n N -r 1 -o json``: prompt tokens/s and decode ms/token as llama.cpp measures them
  (P = the prompt's length, N = the answer's), the figures llama.cpp users quote.

Peak RSS is the subprocess's own (``wait4``), the larger of the two.
"""

from __future__ import annotations

import json
import os
import re
import signal
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
                raise BenchError(f"--llama-cpp {self.root}: its GGUF files were converted from "
                                 f"{source.get('checkpoint')}, "
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
            "--ignore-eos", "--temp", "0", "--repeat-penalty", str(REPETITION_PENALTY), "--repeat-last-n", str(context),
            "-t", str(threads), "-c", str(context), "--no-warmup",
            "-lv", "4", "--log-timestamps"]   # its timers are info lines of its libraries: verbosity 4


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


_STAMP = re.compile(r"^(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) ")   # --log-timestamps: minutes.seconds.ms.us
_FIGURES = {   # key: the figure's pattern in its line
    "image_encode_ms": re.compile(r"mtmd batch encoding done in ([\d.]+) ms"),
    "image_decode_ms": re.compile(r"image decoded \(batch 1/1\) in ([\d.]+) ms"),
    "prompt_eval": re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens"),
    "eval": re.compile(r"[^t] eval time =\s*([\d.]+) ms /\s*(\d+) runs"),
}
_REQUEST_START, _REQUEST_END = "main: loading model:", "llama_perf_context_print:"


def _stamp_ms(line: str) -> float | None:
    match = _STAMP.match(line)
    if match is None:
        return None
    minutes, seconds, ms, us = (int(v) for v in match.groups())
    return (minutes * 60 + seconds) * 1e3 + ms + us / 1e3


def parse_mtmd_log(text: str) -> dict[str, float]:
    """The stages of one ``llama-mtmd-cli`` request from its log (``-lv 4 --log-timestamps``).

    ``request_ms``: from the models loaded ("main: loading model", printed once both are) to llama.cpp's perf
    print after the last token; ``image_encode_ms``: the vision projector's encode; ``image_decode_ms``: the
    image tokens through the decoder; ``eval_ms`` / ``eval_runs``: llama_perf's single-token decode calls;
    ``prompt_eval_tokens``: the tokens it counts as prompt (the prompt, plus the first generated token's decode).
    llama_perf's "prompt eval time" is not used: its clock also runs through the image encode.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        stamp = _stamp_ms(line)
        if _REQUEST_START in line and stamp is not None:
            out["start"] = stamp
        if _REQUEST_END in line and stamp is not None and "end" not in out:
            out["end"] = stamp
        for key, pattern in _FIGURES.items():
            match = pattern.search(line)
            if match is None:
                continue
            if key == "prompt_eval":
                out["prompt_eval_tokens"] = int(match.group(2))
            elif key == "eval":
                out["eval_ms"], out["eval_runs"] = float(match.group(1)), int(match.group(2))
            else:
                out[key] = float(match.group(1))
    if "start" in out and "end" in out:
        out["request_ms"] = out.pop("end") - out.pop("start")
    needed = {"request_ms", "image_encode_ms", "image_decode_ms", "prompt_eval_tokens", "eval_ms", "eval_runs"}
    missing = needed - set(out)
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
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        hint = (" (an instruction this CPU or VM does not allow: rebuild with LLAMA_CPP_NO_AMX=1 "
                "bash bench/llama_cpp_setup.sh ..., see bench/README.md)" if name == "SIGILL" else "")
        raise BenchError(f"{Path(command[0]).name} was killed by {name}{hint}: {stderr[-400:]}")
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
        prompt = build_task_prompt(scenario.task, scenario.categories, None, None, scenario.image_size).text
        context = 4096
        start = time.perf_counter()
        _, log, mtmd_rss = run_tool(mtmd_command(self.tools, self.quant, self._image_file(scenario, image), prompt,
                                                 new_tokens, self.threads, context))
        wall = time.perf_counter() - start
        stages = parse_mtmd_log(log)
        # llama_perf counts the first generated token's decode as prompt: the prompt is the rest
        prompt_tokens = int(stages["prompt_eval_tokens"] - (new_tokens - stages["eval_runs"]))
        stdout, _, bench_rss = run_tool(bench_command(self.tools, self.quant, prompt_tokens, new_tokens, self.threads))
        measured = parse_llama_bench(stdout)
        request, vision, decode = (stages[k] / 1e3 for k in ("request_ms", "image_encode_ms", "eval_ms"))
        return Run(
            # prefill: everything of the request but the image encode and the token-by-token decode (text chunks,
            # image tokens, sampling); end to end: the request after loading
            stages={"preprocess_s": None, "vision_s": vision, "prefill_s": request - vision - decode,
                    "ttft_s": request - decode, "decode_s": decode, "host_s": None, "end_to_end_s": request},
            output_tokens=new_tokens, boxes=scenario.num_boxes, prompt_tokens=prompt_tokens,
            extra={LLAMA_BENCH_PP: measured["pp_tokens_per_s"], LLAMA_BENCH_TG: measured["tg_ms_per_token"],
                   "image_decode_ms": stages["image_decode_ms"], "process_wall_s": wall},
            process_rss_bytes=max(mtmd_rss, bench_rss))
