"""bench/vision_int8 on a tiny bundle: ONNX Runtime's dynamically quantized vision graph is made, run
against the float one on the same images, and its embeddings compared (bookkeeping and agreement, never
timings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from rexedge.bench.vision_int8 import QUANTIZED, compare, main, synthetic_images
from rexedge.export.bundle import export_bundle


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("vision-int8") / "bundle", progress=False)


def test_the_int8_graph_computes_the_float_graphs_embeddings_in_int8(bundle: Path, tmp_path: Path) -> None:
    result = compare(bundle, (93, 61), images=2, repeats=1, threads=1, work=tmp_path)
    graph = onnx.load(tmp_path / QUANTIZED, load_external_data=False)
    ops = {node.op_type for node in graph.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops   # int8 activations and weights, not a copy
    # the tiny encoder's embeddings stay close through int8, and the comparison would see a difference
    assert 0.98 < result["embed_cosine"]["min"] <= result["embed_cosine"]["mean"] < 1.0
    assert 0 < result["embed_max_rel_error"] < 0.2
    assert set(result["seconds_per_image"]) == {"float32", "int8"} and result["int8_speedup"] > 0
    assert result["image_tokens"] > 0 and result["bytes"]["int8"] < result["bytes"]["float32"]


def test_synthetic_images_are_seeded_and_sized() -> None:
    a, b = synthetic_images(2, (65, 47), seed=5), synthetic_images(2, (65, 47), seed=5)
    assert all(x.size == (65, 47) and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))


def test_cli_writes_json_and_reuses_the_quantized_graph(bundle: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"
    main([str(bundle), "--image-size", "64x64", "--images", "1", "--repeats", "1", "--work", str(tmp_path / "w"),
          "--json", str(out)])
    first = (tmp_path / "w" / QUANTIZED).stat().st_mtime_ns
    assert json.loads(out.read_text())["images"] == 1
    main([str(bundle), "--image-size", "64x64", "--images", "1", "--repeats", "1", "--work", str(tmp_path / "w")])
    assert (tmp_path / "w" / QUANTIZED).stat().st_mtime_ns == first
    with pytest.raises(SystemExit):
        main([str(bundle), "--image-size", "64by64"])
    assert "--image-size must be WIDTHxHEIGHT" in capsys.readouterr().err
