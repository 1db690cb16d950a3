"""The llama.cpp baseline of ``rexedge bench`` without llama.cpp: its outputs parsed from recorded samples, the
command lines, the converter's view of a checkpoint, the errors, and the harness round with stand-in tools that
print the recorded outputs (bookkeeping only, never timings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rexedge.bench.baseline_llama_cpp import (
    LLAMA_BENCH_PP,
    LLAMA_BENCH_TG,
    SETUP_SCRIPT,
    SOURCE_FILE,
    LlamaCppDir,
    bench_command,
    mtmd_command,
    parse_llama_bench,
    parse_mtmd_log,
    run_tool,
)
from rexedge.bench.harness import run_bench
from rexedge.bench.report import table
from rexedge.bench.scenarios import BenchError, forced_response, parse_scenario
from rexedge.runtime.request.prompts import DEFAULT_SYSTEM_PROMPT
from rexedge.runtime.request.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).parent / "data" / "llama_cpp"   # recorded from llama.cpp's tools on the 3B checkpoint
BENCH_SAMPLE = SAMPLES / "llama-bench.json"
MTMD_SAMPLE = SAMPLES / "llama-mtmd-cli.log"


def test_parse_llama_bench_recorded_sample() -> None:
    text = BENCH_SAMPLE.read_text()
    tests = json.loads(text)
    pp = next(t for t in tests if t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_prompt"] == 0)
    parsed = parse_llama_bench(text)
    # llama-bench's own averages (one sample each): tokens/s of the prompt test, 1000 / tokens/s per generated token
    assert parsed["pp_tokens_per_s"] == pytest.approx(pp["avg_ts"], rel=1e-6)
    assert parsed["tg_ms_per_token"] == pytest.approx(1e3 / tg["avg_ts"], rel=1e-6)
    with pytest.raises(BenchError, match="no JSON"):
        parse_llama_bench("error: failed to load model\n")
    with pytest.raises(BenchError, match="generation test"):
        parse_llama_bench(json.dumps([pp]))


def _seconds(line: str) -> float:
    minutes, seconds, ms, us = line.split(" ", 1)[0].split(".")   # --log-timestamps: minutes.seconds.ms.us
    return int(minutes) * 60 + int(seconds) + int(ms) / 1e3 + int(us) / 1e6


def test_parse_mtmd_log_recorded_sample() -> None:
    text = MTMD_SAMPLE.read_text()
    lines = text.splitlines()
    parsed = parse_mtmd_log(text)
    # the figures as llama.cpp printed them, read off the sample's lines here by other means
    loaded = next(line for line in lines if "main: loading model" in line)
    perf = [line for line in lines if "llama_perf_context_print" in line]
    assert parsed["request_ms"] == pytest.approx((_seconds(perf[0]) - _seconds(loaded)) * 1e3)
    assert parsed["image_encode_ms"] == float(re.search(r"batch encoding done in (\d+) ms", text).group(1))
    assert parsed["image_decode_ms"] == float(re.search(r"image decoded \(batch 1/1\) in (\d+) ms", text).group(1))
    eval_line = next(line.split("=")[1].split() for line in perf if " eval time" in line and "prompt" not in line)
    assert (parsed["eval_ms"], parsed["eval_runs"]) == (float(eval_line[0]), int(eval_line[3]))
    prompt_line = next(line.split("=")[1].split() for line in perf if "prompt eval time" in line)
    assert parsed["prompt_eval_tokens"] == int(prompt_line[3])
    # the 448x448 image's 256 tokens and the text around them; the stages fit inside the request
    assert parsed["prompt_eval_tokens"] > 256
    assert parsed["image_encode_ms"] + parsed["image_decode_ms"] + parsed["eval_ms"] < parsed["request_ms"]
    with pytest.raises(BenchError, match="eval_ms"):
        parse_mtmd_log(text[: text.index("llama_perf_context_print")])
    with pytest.raises(BenchError, match="request_ms"):
        parse_mtmd_log("\n".join(line for line in lines if "main: loading model" not in line))


def test_command_lines(tmp_path: Path) -> None:
    tools = LlamaCppDir(tmp_path)
    cmd = mtmd_command(tools, "Q4_K_M", tmp_path / "image.png", "Detect cup.", 31, 2, 4096)
    assert cmd[0] == str(tmp_path / "build" / "bin" / "llama-mtmd-cli")
    options = dict(zip(cmd[1::2], cmd[2::2]))   # flag -> value, for the flags that take one
    assert options["-m"] == str(tmp_path / "gguf" / "model-Q4_K_M.gguf")
    assert options["--mmproj"] == str(tmp_path / "gguf" / "mmproj-F16.gguf")
    assert (options["--image"], options["-p"], options["-sys"]) == (str(tmp_path / "image.png"), "Detect cup.",
                                                                   DEFAULT_SYSTEM_PROMPT)
    assert (cmd[cmd.index("-n") + 1], cmd[cmd.index("-t") + 1], cmd[cmd.index("--temp") + 1]) == ("31", "2", "0")
    assert "--ignore-eos" in cmd and cmd[cmd.index("--repeat-penalty") + 1] == "1.05"
    bench = bench_command(tools, "Q8_0", 303, 31, 2)
    assert bench == [str(tmp_path / "build" / "bin" / "llama-bench"), "-m", str(tmp_path / "gguf" / "model-Q8_0.gguf"),
                     "-t", "2", "-p", "303", "-n", "31", "-r", "1", "-o", "json"]


def test_converter_view_passes_the_converters_vocabulary_check(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from rexedge.bench.llama_cpp_convert import write_converter_view

    vocab_size = json.loads((tiny_checkpoint / "config.json").read_text())["vocab_size"]
    # transformers re-numbers Rex-Omni's coordinate tokens past the vocabulary: the converter's check fails
    assert max(AutoTokenizer.from_pretrained(tiny_checkpoint).vocab.values()) >= vocab_size
    view = tmp_path / "view"
    view.mkdir()
    assert write_converter_view(tiny_checkpoint, view) == 1000   # the coordinate tokens
    tokenizer = AutoTokenizer.from_pretrained(view)
    assert max(tokenizer.vocab.values()) < vocab_size
    ids = Tokenizer.from_dir(tiny_checkpoint).ids   # rexedge's ids, from the original files
    for name in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|box_start|>"):
        assert tokenizer.convert_tokens_to_ids(name) == getattr(ids, name.strip("<|>"))
    for item in tiny_checkpoint.iterdir():   # everything else is the checkpoint's own file
        if item.name != "tokenizer_config.json":
            assert (view / item.name).resolve() == item.resolve()


def test_a_tool_that_dies_names_the_signal_and_the_no_amx_build(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match=r"killed by SIGILL .*LLAMA_CPP_NO_AMX=1"):
        run_tool(["sh", "-c", "echo dying >&2; kill -ILL $$"])
    with pytest.raises(BenchError, match=r"exited with status 3: .*bad model"):
        run_tool(["sh", "-c", "echo bad model >&2; exit 3"])
    stdout, _, peak = run_tool(["sh", "-c", "echo fine"])
    assert stdout == "fine\n" and peak > 0


def test_setup_script_refuses_bad_arguments(tmp_path: Path) -> None:
    script = ROOT / SETUP_SCRIPT
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
    not_checkpoint = subprocess.run(["bash", str(script), str(tmp_path), str(tmp_path / "out")], capture_output=True,
                                    text=True)
    assert not_checkpoint.returncode == 2 and "not a checkpoint" in not_checkpoint.stderr
    assert not (tmp_path / "out").exists()


def test_missing_tools_name_the_setup_script(tiny_checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from rexedge.runtime.cli import main

    scenario = [parse_scenario("56x56:2/1")]
    with pytest.raises(BenchError, match=re.escape(f"bash {SETUP_SCRIPT} CHECKPOINT {tmp_path}")):
        run_bench(str(tiny_checkpoint), ["ort"], scenario, baseline="llama.cpp", llama_cpp=tmp_path, log=print)
    with pytest.raises(BenchError, match="go together"):
        run_bench(str(tiny_checkpoint), ["ort"], scenario, baseline="llama.cpp", log=print)
    assert main(["bench", "--model", str(tiny_checkpoint), "--baseline", "llama.cpp", "--llama-cpp", str(tmp_path),
                 "--scenario", "56x56:2/1"]) == 2
    assert "llama-mtmd-cli" in capsys.readouterr().err


_FAKE_TOOL = """#!{python}
# stands in for llama.cpp's {tool}: checks its arguments, prints the recorded output
import re, sys
from pathlib import Path
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
assert Path(value("-m")).is_file() and value("-t") == "1", args
if "{tool}" == "llama-bench":
    print(Path("{bench}").read_text())
else:
    assert Path(value("--mmproj")).is_file() and Path(value("--image")).is_file() and "--ignore-eos" in args, args
    log = Path("{mtmd}").read_text()
    # as the real tool: one decode call fewer than tokens asked (the first token's is counted as prompt)
    runs = str(int(value("-n")) - 1)
    eval_runs = r"([^t] eval time =\\s+[\\d.]+ ms /\\s+)\\d+ runs"
    sys.stderr.write(re.sub(eval_runs, lambda m: m.group(1) + runs + " runs", log))
"""


def _fake_llama_cpp(root: Path, checkpoint: Path) -> LlamaCppDir:
    tools = LlamaCppDir(root)
    for tool, path in (("llama-bench", tools.bench), ("llama-mtmd-cli", tools.mtmd)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_FAKE_TOOL.format(python=sys.executable, tool=tool, bench=BENCH_SAMPLE, mtmd=MTMD_SAMPLE))
        os.chmod(path, 0o755)
    for file in (tools.gguf("F16"), tools.gguf("Q8_0"), tools.mmproj):
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"GGUF")
    config = json.loads((checkpoint / "config.json").read_text())
    (root / SOURCE_FILE).write_text(json.dumps({"checkpoint": str(checkpoint), "config_json": config}))
    return tools


def test_harness_pairs_each_bundle_with_its_llama_cpp_type(tiny_checkpoint: Path, tmp_path: Path) -> None:
    _fake_llama_cpp(tmp_path / "llama", tiny_checkpoint)
    scenario = parse_scenario("56x84:3/2")
    result = run_bench(str(tiny_checkpoint), ["ort"], [scenario], baseline="llama.cpp", repeats=2, warmup=0,
                       threads=1, weights=["float", "int8"], llama_cpp=tmp_path / "llama", workdir=tmp_path / "work",
                       log=lambda line: None)
    records = {r["backend"]: r for r in json.loads(json.dumps(result))["records"]}
    assert list(records) == ["ort", "ort-int8", "llama.cpp-F16", "llama.cpp-Q8_0"]
    pairs = {"ort": "llama.cpp-F16", "ort-int8": "llama.cpp-Q8_0", "llama.cpp-F16": None, "llama.cpp-Q8_0": None}
    assert {name: r["compared_with"] for name, r in records.items()} == pairs
    recorded = parse_mtmd_log(MTMD_SAMPLE.read_text())
    llama_bench = parse_llama_bench(BENCH_SAMPLE.read_text())
    answer = len(forced_response(scenario, Tokenizer.from_dir(tiny_checkpoint)))
    for name, r in records.items():
        m = r["metrics"]
        if r["baseline"]:
            assert r["decoding"] == "greedy" and r["speedup_vs_baseline"] is None and r["steps"] == {}
            request, encode = recorded["request_ms"], recorded["image_encode_ms"]
            assert m["end_to_end_ms"]["median"] == pytest.approx(request)
            assert m["vision_ms"]["median"] == pytest.approx(encode)
            assert m["decode_ms"]["median"] == pytest.approx(recorded["eval_ms"])
            assert m["ttft_ms"]["median"] == pytest.approx(request - recorded["eval_ms"])
            assert m["prefill_ms"]["median"] == pytest.approx(request - encode - recorded["eval_ms"])
            assert m["decode_ms_per_token"]["median"] == pytest.approx(recorded["eval_ms"] / answer, rel=1e-3)
            prompt = recorded["prompt_eval_tokens"] - 1
            assert r["prompt_tokens"] == prompt
            assert m["prompt_tokens_per_s"]["median"] == pytest.approx(
                prompt / (request - encode - recorded["eval_ms"]) * 1e3, rel=1e-3)
            assert m[LLAMA_BENCH_TG]["median"] == pytest.approx(llama_bench["tg_ms_per_token"], rel=1e-3)
            assert m[LLAMA_BENCH_PP]["median"] == pytest.approx(llama_bench["pp_tokens_per_s"], rel=1e-3)
            assert r["output_tokens"] == answer
            assert r["memory"]["peak_rss_bytes"] > 0 and r["memory"]["base_rss_bytes"] is None
            assert m["preprocess_ms"] is None and m["host_ms"] is None
            continue
        base = records[pairs[name]]["metrics"]
        assert not r["baseline"] and r["output_tokens"] == answer
        for key, metric in (("end_to_end", "end_to_end_ms"), ("ttft", "ttft_ms"),
                            ("decode_per_token", "decode_ms_per_token")):
            ratio = base[metric]["median"] / m[metric]["median"]
            assert r["speedup_vs_baseline"][key] == pytest.approx(ratio, rel=1e-2)
    text = table(result)
    assert "llama.cpp-Q8_0" in text and "llama-bench" in text
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["bundle-float", "bundle-int8"]
    with open(tmp_path / "work" / "bundle-int8" / "manifest.json") as f:
        assert "int8" in f.read()   # the int8 bundle's graphs record their weight format
    lines: list[str] = []
    run_bench(str(tiny_checkpoint), ["ort"], [scenario], baseline="llama.cpp", repeats=1, warmup=0, threads=1,
              weights=["int8"], llama_cpp=tmp_path / "llama", workdir=tmp_path / "work", log=lines.append)
    assert f"bench: reusing {tmp_path / 'work' / 'bundle-int8'}" in lines and not any("export" in x for x in lines)
