"""``rexedge export --vision-weights int8``: the vision graph through ONNX Runtime's dynamic quantization,
recorded in the manifest, run by the ort backend, its image embeddings against the float graph's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from rexedge.export.bundle import ExportError, export_bundle
from rexedge.runtime import manifest as schema
from rexedge.runtime.api import RexOmni
from rexedge.runtime.backends.ort import OrtBackend
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.cli import main
from rexedge.runtime.request.preprocess import preprocess


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("vision-int8")
    return (export_bundle(tiny_checkpoint, work / "float", progress=False),
            export_bundle(tiny_checkpoint, work / "int8", weights="int4", vision_weights="int8", progress=False))


def test_the_vision_graph_computes_in_int8_and_says_so(bundles: tuple[Path, Path]) -> None:
    _, int8 = bundles
    bundle = load_bundle(int8)
    entry = bundle.manifest[schema.GRAPHS][schema.VISION]
    assert bundle.vision.file == "vision.int8.onnx" and bundle.vision.data == "vision.int8.onnx.data"
    assert entry[schema.WEIGHTS]["format"] == "int8" and entry[schema.WEIGHTS]["op"] == "MatMulInteger"
    assert not (int8 / schema.VISION_FILE).exists() and "vision.onnx.data" not in bundle.manifest[schema.FILES]
    graph = onnx.load(int8 / bundle.vision.file, load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "MatMul" not in ops and ops.count("MatMulInteger") == len(entry[schema.WEIGHTS]["quantized"]) > 0
    assert bundle.decoder.weights["format"] == "int4"   # the decoder's own option is independent


def test_int8_image_embeddings_follow_the_float_graphs(bundles: tuple[Path, Path]) -> None:
    rng = np.random.default_rng()
    size = (int(rng.integers(60, 200)), int(rng.integers(60, 200)))
    image = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).resize(size)
    backends = [OrtBackend(b) for b in bundles]
    pre = preprocess(image, 16 * 28 * 28, 64 * 28 * 28, cfg=backends[0].config)
    reference, got = (b.encode_image(pre).astype(np.float64) for b in backends)
    cosine = float((reference * got).sum() / np.linalg.norm(reference) / np.linalg.norm(got))
    assert reference.shape == got.shape and 0.98 < cosine < 1.0   # quantized (not the float graph), and close


def test_a_vision_int8_bundle_detects_end_to_end(bundles: tuple[Path, Path]) -> None:
    (result,) = RexOmni(bundles[1]).inference(Image.new("RGB", (120, 90), (200, 180, 40)), task="detection",
                                              categories=["cup"])
    assert result["success"] and result["image_size"] == (120, 90) and result["raw_output"]
    assert isinstance(result["extracted_predictions"], dict)


def test_vision_weights_are_refused_where_onnx_runtime_int8_cannot_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    for kwargs in ({"flavour": "trt"}, {"precision": "fp16"}):
        with pytest.raises(ExportError, match="vision_weights 'int8' needs the ort flavour at fp32"):
            export_bundle(tiny_checkpoint, tmp_path / "x", vision_weights="int8", progress=False, **kwargs)
    with pytest.raises(ExportError, match="vision_weights 'int4': expected 'int8'"):
        export_bundle(tiny_checkpoint, tmp_path / "x", vision_weights="int4", progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_export_vision_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    main(["export", str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--vision-weights", "int8", "--quiet"])
    manifest = json.loads((tmp_path / "b" / schema.MANIFEST).read_text())
    assert manifest[schema.GRAPHS][schema.VISION][schema.WEIGHTS]["activations"] == "int8, per call"
