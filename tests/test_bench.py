"""The benchmark harness (rexedge.bench) on the tiny checkpoint: schema and bookkeeping, never timings."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from rexedge.bench.harness import SCHEMA, run_bench
from rexedge.bench.report import plot, table
from rexedge.bench.scenarios import BenchError, Scenario, forced_response, parse_scenario
from rexedge.bench.scripted import ScriptedHead, TimedBackend
from rexedge.runtime.request.tokenizer import Tokenizer
from rexedge.runtime.results.parse import parse_prediction

STATS = {"median", "p90", "n"}
STAGE_METRICS = {"preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms", "host_ms", "end_to_end_ms",
                 "decode_ms_per_token", "host_ms_per_token", "prompt_tokens_per_s", "tokens_per_s", "boxes_per_s"}
STEP_FIELDS = {"steps", "tokens", "forced_tokens", "ms_per_step", "head_ms_per_step", "backend_ms_per_step", "ms_per_token",
               "bytes_per_step", "floor_ms_per_step", "bandwidth_pct"}
MEMORY_FIELDS = {"base_rss_bytes", "load_rss_bytes", "retained_rss_bytes", "peak_rss_bytes", "peak_gpu_bytes"}
# the documented output format (docs/model.md): groups joined by ", ", items by ",", then <|im_end|>
GROUP = r"<\|object_ref_start\|>[^<]+<\|object_ref_end\|><\|box_start\|>(?:{item})(?:,(?:{item}))*<\|box_end\|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoint)


@pytest.mark.parametrize("task, per_item, boxes, categories", [("detection", 4, 7, 3), ("pointing", 2, 5, 5)])
def test_forced_response_is_the_documented_format(tokenizer: Tokenizer, task: str, per_item: int, boxes: int,
                                                  categories: int) -> None:
    scenario = Scenario("s", (333, 217), boxes, categories, task=task)
    text = tokenizer.decode(forced_response(scenario, tokenizer, seed=3))
    group = GROUP.format(item="<\\d+>" * per_item)
    assert re.fullmatch(f"{group}(?:, {group})*<\\|im_end\\|>", text), text
    parsed = parse_prediction(text, 333, 217, task)  # the independent parser of the official format
    assert list(parsed) == scenario.categories
    counts = [len(items) for items in parsed.values()]
    assert sum(counts) == boxes and max(counts) - min(counts) <= 1
    items = [tuple(map(int, re.findall(r"<(\d+)>", g))) for g in re.findall(r"((?:<\d+>){%d})" % per_item, text)]
    assert len(set(items)) == boxes and all(any(items[i]) for i in range(boxes))
    if task == "detection":
        assert all(x0 < x1 and y0 < y1 for x0, y0, x1, y1 in items)


def test_parse_scenario() -> None:
    s = parse_scenario("640x480:12/3:pointing:exact")
    assert (s.image_size, s.num_boxes, s.num_categories, s.task, s.decoding) == ((640, 480), 12, 3, "pointing", "exact")
    assert parse_scenario("det-1428x812").image_size == (1428, 812)
    for bad in ("640x480", "axb:1/1", "640x480:2/3", "640x480:3/3:keypoint", "10x480:3/3"):
        with pytest.raises(BenchError):
            parse_scenario(bad)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rexedge.export.bundle import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bench") / "bundle", progress=False)


def test_scripted_head_refuses_a_response_outside_the_grammar(tiny_bundle: Path, tokenizer: Tokenizer) -> None:
    from rexedge.runtime.api import RexOmni
    from rexedge.runtime.decode.head import Sampling
    from rexedge.runtime.decode.loop import DecodeLoop, Limits

    scenario = Scenario("s", (84, 84), 2, 1)
    script = forced_response(scenario, tokenizer)
    first_coord = next(i for i, t in enumerate(script) if tokenizer.ids.is_coord(t))
    script[first_coord] = tokenizer.ids.comma  # text where the grammar wants a coordinate
    model = RexOmni(tiny_bundle, max_context=512)
    head = ScriptedHead(model.backend.make_head(Sampling()), script)
    model.loop = DecodeLoop(TimedBackend(model.backend, head), head, model.ids, limits=Limits(max_new_tokens=64))
    with pytest.raises(BenchError, match="coordinate step"):
        model.inference(np.zeros((84, 84, 3), np.uint8), categories=scenario.categories)


def _check_stats(value: dict) -> None:
    assert set(value) == STATS and value["n"] >= 1
    assert math.isfinite(value["median"]) and value["median"] <= value["p90"] + 1e-9


def test_harness_json_schema(tiny_checkpoint: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    scenarios = [parse_scenario("84x56:5/2"), parse_scenario("56x56:3/2:pointing:exact")]
    result = run_bench(str(tiny_checkpoint), ["ort", "torch"], scenarios, baseline="transformers", repeats=1,
                       warmup=0, log=lambda line: None)
    result = json.loads(json.dumps(result))  # what a reader of the file sees
    assert result["schema"] == SCHEMA
    assert {"date", "command", "machine", "model", "settings", "records"} <= set(result)
    assert result["machine"]["bandwidth_gbs"] > 0 and result["model"]["vocab_size"] == 2048
    records = {(r["scenario"], r["backend"]): r for r in result["records"]}
    assert set(records) == {(s.name, b) for s in scenarios for b in ("ort", "torch", "transformers")}
    for (name, backend), r in records.items():
        scenario = next(s for s in scenarios if s.name == name)
        script = forced_response(scenario, tokenizer)
        assert r["output_tokens"] == len(script) and r["repeats"] == 1 and r["boxes"] == scenario.num_boxes
        assert set(r["metrics"]) == STAGE_METRICS
        for key, value in r["metrics"].items():
            if value is None:
                assert backend == "transformers" and key in ("host_ms", "host_ms_per_token")
            else:
                _check_stats(value)
        assert set(r["memory"]) == MEMORY_FIELDS and r["memory"]["peak_rss_bytes"] >= r["memory"]["base_rss_bytes"] > 0
        assert r["load_s"] > 0
        for kind, step in r["steps"].items():
            assert set(step) == STEP_FIELDS and step["bytes_per_step"] > 0
            for key in ("ms_per_step", "head_ms_per_step", "backend_ms_per_step", "ms_per_token"):
                _check_stats(step[key])
        # every token but the last is appended by some step
        assert sum(step["tokens"] for step in r["steps"].values()) == len(script) - 1
        assert r["metrics"]["prompt_tokens_per_s"]["median"] == pytest.approx(
            r["prompt_tokens"] / r["metrics"]["prefill_ms"]["median"] * 1e3, rel=1e-3)   # one repeat: its own ratio
        if backend == "transformers":
            assert r["baseline"] and r["speedup_vs_baseline"] is None and set(r["steps"]) == {"full"}
            assert r["compared_with"] is None
            continue
        assert not r["baseline"] and set(r["speedup_vs_baseline"]) == {"end_to_end", "ttft", "decode_per_token"}
        assert r["compared_with"] == "transformers"
        assert all(v > 0 for v in r["speedup_vs_baseline"].values())
        if scenario.decoding == "exact":
            assert set(r["steps"]) == {"free"}  # every token over the full vocabulary, one per step
            assert r["steps"]["free"]["forced_tokens"] == 0 and r["steps"]["free"]["steps"] == len(script) - 1
        else:
            coords = sum(tokenizer.ids.is_coord(t) for t in script)
            assert r["steps"]["coord"]["steps"] == coords == 4 * scenario.num_boxes
            # the forced tokens ride in the step of the choice before them: <|box_start|> after the phrase's
            # chosen <|object_ref_end|> (free), " " <|object_ref_start|> after the "," between groups (choice);
            # no step holds forced tokens only, and every step holds one chosen token
            groups = scenario.num_categories
            assert "forced" not in r["steps"]
            assert [r["steps"][kind]["forced_tokens"] for kind in ("free", "coord", "choice")] == [groups, 0, 2 * (groups - 1)]
            assert sum(step["steps"] for step in r["steps"].values()) == len(script) - 1 - (groups + 2 * (groups - 1))
            # the full head reads the whole vocabulary, a coordinate step 1,000 rows of it
            assert r["steps"]["free"]["bytes_per_step"] > r["steps"]["coord"]["bytes_per_step"]

    assert "ort" in table(result) and "coord" in table(result)
    out = plot(result, tmp_path / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_writes_json_and_plot(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rexedge.runtime.cli import main

    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--model", str(tiny_checkpoint), "--backend", "ort", "--scenario", "56x56:2/1",
                 "--repeats", "1", "--warmup", "0", "--json", str(out), "--plot", str(png)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [(r["backend"], r["speedup_vs_baseline"]) for r in result["records"]] == [("ort", None)]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "56x56:2/1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--backend", "torch", "--model", "BUNDLE"], "need(s) a checkpoint"),
    (["--scenario", "nonsense"], "expected one of"),
    (["--model", "/nonexistent/model"], "not a preset"),
])
def test_cli_bench_errors(tiny_bundle: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    from rexedge.runtime.cli import main

    argv = [str(tiny_bundle) if a == "BUNDLE" else a for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_bundle)]
    assert main(["bench", *argv, "--repeats", "1", "--warmup", "0"]) == 2
    assert message in capsys.readouterr().err


def test_real_layout_tokenizer_has_the_published_ids(tmp_path: Path) -> None:
    """The tokenizer cpu-bench / rex-omni-3b checkpoints get: the ids docs/model.md lists for the real model."""
    from rexedge.export.fixtures.tiny_tokenizer import QWEN_SPECIAL_TOKENS, REAL_NUM_ORDINARY, write_tiny_tokenizer
    from rexedge.runtime.config import RexOmniConfig

    for preset in ("cpu-bench", "rex-omni-3b"):  # write_tiny_checkpoint derives the layout from these ids
        assert RexOmniConfig.preset(preset).image_token_id - QWEN_SPECIAL_TOKENS.index("<|image_pad|>") == REAL_NUM_ORDINARY
    write_tiny_tokenizer(tmp_path, num_ordinary=REAL_NUM_ORDINARY)
    assert len(json.loads((tmp_path / "vocab.json").read_text())) == 151643
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.ids
    assert (ids.coord_start, ids.endoftext, ids.im_start, ids.im_end, ids.object_ref_start, ids.object_ref_end,
            ids.box_start, ids.box_end, ids.vision_start, ids.vision_end, ids.image_pad) == (
        150643, 151643, 151644, 151645, 151646, 151647, 151648, 151649, 151652, 151653, 151655)
    assert (ids.comma, ids.space, tok.encode_text("\n")) == (11, 220, [198])
    text = "Detect person, car. Output the bounding box coordinates in [x0, y0, x1, y1] format.\t\t9"
    encoded = tok.encode_text(text)
    assert max(encoded) < 2000 and tok.decode(encoded) == text  # filler tokens are never produced
    assert tok.decode([150643, 151642, 151645]) == "<0><999><|im_end|>"


def test_weights_quality_compares_each_bundle_with_the_first(tiny_checkpoint: Path, tiny_bundle: Path,
                                                             tmp_path: Path) -> None:
    """The same bundle twice agrees exactly (cosines 1, every argmax); an int4 bundle, teacher-forced on the
    reference's tokens, moves the hidden states but stays in the same direction."""
    import shutil

    from rexedge.bench.weights_quality import main
    from rexedge.export.bundle import export_bundle

    twin = Path(shutil.copytree(tiny_bundle, tmp_path / "twin"))
    int4 = export_bundle(tiny_checkpoint, tmp_path / "int4", progress=False, weights="int4")
    out = tmp_path / "quality.json"
    main(["--bundle", f"float={tiny_bundle}", "--bundle", f"twin={twin}", "--bundle", f"int4={int4}",
          "--steps", "9", "--image-size", "123x97", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["reference"] == "float" and result["request"]["positions"] == 9
    twin_row, int4_row = result["rows"]["twin"], result["rows"]["int4"]
    for key in ("hidden_cosine_min", "coord_logit_cosine_min", "coord_argmax_agreement", "token_agreement"):
        assert twin_row[key] == pytest.approx(1.0, abs=1e-6)
    assert 0 < int4_row["hidden_cosine_min"] < 1 - 1e-6 and 0 < int4_row["coord_logit_cosine_mean"] < 1


def test_a_full_vocabulary_step_of_an_int4_bundle_reads_its_head_graph(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The byte model of a weight-quantized bundle: a full-vocabulary step reads the decoder's and the int8 head
    graph's weight files (not the float table); a coordinate step the decoder's and 1,000 float rows."""
    from rexedge.bench.runners import RexedgeRunner
    from rexedge.export.bundle import export_bundle

    int4 = export_bundle(tiny_checkpoint, tmp_path / "int4", progress=False, weights="int4")
    model = RexedgeRunner("ort", int4, "cpu", 512).byte_model
    cfg = model.cfg
    decoder, head = (int4 / "decoder.onnx.data").stat().st_size, (int4 / "head.onnx.data").stat().st_size
    assert model.step_bytes(0, cfg.vocab_size) == decoder + head
    assert model.step_bytes(0, 1000) == decoder + 1000 * cfg.hidden_size * 4
