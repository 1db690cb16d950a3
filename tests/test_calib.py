"""INT8 calibration (``rexedge calibrate``): the calibration set, the Q/DQ graphs, and INT8 vs FP32 agreement.

Thresholds for agreement come from bench/int8_quality.py on the tiny checkpoint (8 held-out
requests x 64 steps, see the module docstring of that script): image-embedding cosine
0.997, final-hidden cosine mean 0.992 (worst step 0.92), coordinate-logit cosine mean
0.992, teacher-forced greedy agreement 0.83. The tiny model is a hard case for argmax
agreement: random embeddings (std 0.05) make its logits nearly flat, so a perturbation
that barely moves the hidden state flips the top token (fp16 alone moves 0.2% of them).
The thresholds below sit under those measurements with room for the variation between
requests, and far above what an unrelated model of the same shapes scores (cosine ~0,
agreement ~0), which ``test_agreement_thresholds_reject_an_unrelated_model`` checks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rexedge.calib.dataset import (
    CalibrationError,
    DecoderReader,
    find_images,
    plan_samples,
)
from rexedge.calib.graph_backend import GraphBackend
from rexedge.calib.quality import compare, summarize
from rexedge.calib.quantize import quantize_bundle
from rexedge.export.onnx.decoder import FLAVOURS
from rexedge.runtime.backends import load_backend
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.cli import main
from rexedge.runtime.request.positions import decode_positions
from rexedge.runtime.request.preprocess import preprocess
from rexedge.runtime.request.prompts import TASKS

THRESHOLDS = {"image_embed_cosine": 0.98, "hidden_cosine_mean": 0.97, "coord_logit_cosine_mean": 0.97,
              "token_agreement": 0.6}


def _write_images(directory: Path, sizes: list[tuple[int, int]], seed: int) -> Path:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        image = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        ImageDraw.Draw(image).rectangle((w // 5, h // 4, w // 2, h // 2 + 7), fill=(220, 40, 30))
        image.save(directory / f"img_{i}.png")
    return directory


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calib")


@pytest.fixture(scope="module")
def fp32_bundle(tiny_checkpoint: Path, work: Path) -> Path:
    from rexedge.export.bundle import export_bundle

    return export_bundle(tiny_checkpoint, work / "fp32", progress=False)


@pytest.fixture(scope="module")
def images(work: Path) -> Path:
    directory = _write_images(work / "images", [(131, 97), (70, 190), (160, 120)], seed=11)
    (directory / "broken.jpg").write_bytes(b"not an image at all")
    return directory


@pytest.fixture(scope="module")
def int8_bundle(fp32_bundle: Path, images: Path, work: Path) -> Path:
    return quantize_bundle(fp32_bundle, work / "int8", images, num=8, steps=6, progress=False)


@pytest.fixture(scope="module")
def eval_images(work: Path) -> list[Path]:
    return find_images(_write_images(work / "eval", [(150, 101), (97, 160)], seed=12))


def _graph(bundle: Path, name: str, data: bool = False) -> onnx.ModelProto:
    return onnx.load(str(bundle / name), load_external_data=data)


# the calibration set ---------------------------------------------------------------


def test_plan_mixes_every_task_and_uses_every_image_before_repeating(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    samples = plan_samples(paths, None, 8, seed=4)
    assert [s.task for s in samples] == list(TASKS)
    assert {s.image for s in samples[:3]} == set(paths) and {s.image for s in samples[3:6]} == set(paths)
    assert samples == plan_samples(paths, None, 8, seed=4)
    for s in samples:
        if s.task == "visual_prompting":
            assert s.box_fractions and all(0 <= v <= 1 for box in s.box_fractions for v in box)
            assert all(x0 < x1 and y0 < y1 for x0, y0, x1, y1 in s.box_fractions)
        elif s.task == "keypoint":
            assert s.keypoint_type in ("person", "animal") and len(s.categories) == 1
        else:
            assert 1 <= len(s.categories) <= 3


def test_decoder_reader_gives_prefill_then_decode_calls_with_their_cache(fp32_bundle: Path, images: Path) -> None:
    backend = GraphBackend(fp32_bundle)
    # keypoint answers open with forced tokens (```json), so decode calls follow even if the random model
    # would end its answer at once
    [sample] = plan_samples(find_images(images)[1:2], ["keypoint"], 1)
    reader = DecoderReader(backend, [sample], steps=5)
    feeds = list(iter(reader.get_next, None))
    prefill, steps = feeds[0], feeds[1:]
    image = preprocess(sample.image, cfg=backend.config)
    assert prefill["inputs_embeds"].shape[1] > image.num_image_tokens and 1 <= len(steps) <= 5
    length = prefill["inputs_embeds"].shape[1]
    for feed in steps:
        tokens = feed["inputs_embeds"].shape[1]
        # the ort flavour's cache contract: seqlens_k = total - 1, keys written up to the cache length
        assert feed["total_sequence_length"] == length + tokens and feed["seqlens_k"][0] == length + tokens - 1
        assert np.abs(feed["past_key_0"][0, :, :length]).sum() > 0
        assert not feed["past_key_0"][0, :, length:].any()
        length += tokens


def test_graph_backend_matches_the_ort_backend(fp32_bundle: Path) -> None:
    """The numpy-cache backend calibration uses computes what the runtime's in-place backend computes."""
    rng = np.random.default_rng(5)
    reference, backend = load_backend("ort", fp32_bundle), GraphBackend(fp32_bundle, decode_reserve=4)
    embeds = rng.standard_normal((23, backend.config.hidden_size)).astype(np.float32) * 0.05
    positions = np.tile(np.arange(23), (3, 1))
    np.testing.assert_allclose(backend.prefill(embeds, positions), reference.prefill(embeds, positions), atol=1e-5)
    for tokens in ([7], [1003, 1500], [42]):
        ids = np.array(tokens, np.int64)
        where = decode_positions(reference.cache_length, -3, len(tokens))
        np.testing.assert_allclose(backend.step(ids, where), reference.step(ids, where), atol=1e-5)
    assert backend.cache_length == reference.cache_length == 27


# the written bundle and its graphs ------------------------------------------------------


def test_calibrate_writes_a_checked_int8_bundle(fp32_bundle: Path, int8_bundle: Path) -> None:
    source, bundle = load_bundle(fp32_bundle), load_bundle(int8_bundle)  # sizes and sha256 of every file
    assert bundle.precision == "int8" and bundle.flavour == source.flavour
    assert bundle.vision.inputs == source.vision.inputs and bundle.decoder.outputs == source.decoder.outputs
    for name in ("embed_tokens.npy", "tokenizer.json"):
        assert (int8_bundle / name).read_bytes() == (fp32_bundle / name).read_bytes()
    q = bundle.manifest["quantization"]
    assert q["format"] == "QDQ" and q["samples"] == 8 and q["images"] == 3
    assert list(q["skipped_images"]) == [str(fp32_bundle.parent / "images" / "broken.jpg")]
    assert q["feeds"]["vision"] == 3 and q["feeds"]["decoder"] > 8


def test_every_linear_layer_is_int8_with_per_channel_weights(fp32_bundle: Path, int8_bundle: Path) -> None:
    for graph in ("vision.onnx", "decoder.onnx"):
        source, model = _graph(fp32_bundle, graph), _graph(int8_bundle, graph)
        weights = {t.name for t in source.graph.initializer}
        linear = {n.input[1] for n in source.graph.node if n.op_type == "MatMul" and n.input[1] in weights}
        init = {t.name: t for t in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        consumers = {}
        for n in model.graph.node:
            for name in n.input:
                consumers.setdefault(name, []).append(n)
        seen = set()
        for node in (n for n in model.graph.node if n.op_type == "MatMul"):
            a, b = producer.get(node.input[0]), producer.get(node.input[1])
            if b is None or b.op_type != "DequantizeLinear":
                assert a is None or a.op_type != "DequantizeLinear"  # attention: both inputs float
                continue
            weight, scale, zero = (init[name] for name in b.input)
            assert weight.data_type == onnx.TensorProto.INT8 and list(scale.dims) == [weight.dims[1]]
            assert {a.name: a.i for a in b.attribute}.get("axis") == 1  # per output channel of [in, out]
            assert not numpy_helper.to_array(zero).any()
            assert a.op_type == "DequantizeLinear" and producer[a.input[0]].op_type == "QuantizeLinear"
            assert len(consumers[a.output[0]]) == 1  # one pair per consumer: what ORT fuses to an integer MatMul
            act_scale, act_zero = init[a.input[1]], init[a.input[2]]
            assert list(act_scale.dims) == [] and act_zero.data_type == onnx.TensorProto.INT8
            assert numpy_helper.to_array(act_zero) == 0
            assert all(c.op_type != "QuantizeLinear" for c in consumers[node.output[0]])  # outputs stay float
            seen.add(weight.name.removesuffix("_quantized"))
        assert seen == linear, graph
    ops = {n.op_type for n in _graph(int8_bundle, "decoder.onnx").graph.node}
    assert "GroupQueryAttention" in ops


def test_weight_scales_are_the_symmetric_per_channel_range(fp32_bundle: Path, int8_bundle: Path) -> None:
    """scale_j = max |W[:, j]| / 127 and every weight within half a step of its int8 value."""
    source = {t.name: numpy_helper.to_array(t) for t in _graph(fp32_bundle, "decoder.onnx", True).graph.initializer}
    quant = {t.name: numpy_helper.to_array(t) for t in _graph(int8_bundle, "decoder.onnx", True).graph.initializer}
    checked = 0
    for name, w in source.items():
        if name + "_quantized" not in quant:
            continue
        q, scale = quant[name + "_quantized"].astype(np.float64), quant[name + "_scale"].astype(np.float64)
        np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
        assert np.all(np.abs(q * scale - w) <= scale / 2 * (1 + 1e-5))
        checked += 1
    assert checked == 7 * load_bundle(fp32_bundle).config.num_hidden_layers


def test_pixel_input_range_is_the_calibration_images_range(int8_bundle: Path, images: Path) -> None:
    """The activation statistics come from the calibration set: the patch embedding's input is the
    pixel rows themselves, so its scale is max |pixel| over the calibration images / 127."""
    cfg = load_bundle(int8_bundle).config
    expected = max(float(np.abs(preprocess(p, cfg=cfg).pixel_patches).max())
                   for p in find_images(images) if p.suffix == ".png") / 127
    model = _graph(int8_bundle, "vision.onnx", True)
    init = {t.name: t for t in model.graph.initializer}
    [q] = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "pixel_patches"]
    assert float(numpy_helper.to_array(init[q.input[1]])) == pytest.approx(expected, rel=1e-6)


# agreement ---------------------------------------------------------------------------------


def _agreement(reference, candidate, images: list[Path]) -> dict[str, float]:
    requests = plan_samples(images, ["detection", "keypoint", "ocr_box", "pointing"], 4, seed=2)
    return summarize([compare(reference, candidate, r, steps=24) for r in requests])


def test_int8_agrees_with_fp32_on_the_ort_backend(fp32_bundle: Path, int8_bundle: Path,
                                                  eval_images: list[Path]) -> None:
    summary = _agreement(load_backend("ort", fp32_bundle), load_backend("ort", int8_bundle), eval_images)
    for key, threshold in THRESHOLDS.items():
        assert summary[key] >= threshold, (key, summary)


def test_agreement_thresholds_reject_an_unrelated_model(fp32_bundle: Path, work: Path,
                                                        eval_images: list[Path]) -> None:
    from rexedge.export.bundle import export_bundle
    from rexedge.export.fixtures.tiny import write_tiny_checkpoint

    other = export_bundle(write_tiny_checkpoint(work / "other_ckpt", seed=7), work / "other", progress=False)
    summary = _agreement(load_backend("ort", fp32_bundle), load_backend("ort", other), eval_images)
    assert all(summary[key] < threshold for key, threshold in THRESHOLDS.items()), summary


def test_the_ort_backend_runs_the_int8_bundle_end_to_end(int8_bundle: Path, eval_images: list[Path]) -> None:
    from rexedge.runtime.api import RexOmni

    model = RexOmni(int8_bundle, decoding="exact", max_tokens=12)
    [result] = model.inference(eval_images[0], task="detection", categories=["cup", "dog"])
    assert result["success"] and result["num_output_tokens"] >= 1
    # the in-place runtime and plain runs of the same Q/DQ graphs agree
    reference = GraphBackend(int8_bundle)
    image = preprocess(eval_images[0], cfg=reference.config)
    np.testing.assert_allclose(model.backend.encode_image(image), reference.encode_image(image), atol=1e-5)


@pytest.mark.skipif("trt" not in FLAVOURS, reason="the trt decoder flavour is not in this tree")
def test_calibrating_a_trt_flavour_bundle(tiny_checkpoint: Path, images: Path, work: Path,
                                          eval_images: list[Path]) -> None:
    from rexedge.export.bundle import export_bundle

    source = export_bundle(tiny_checkpoint, work / "trt32", flavour="trt", progress=False)
    int8 = quantize_bundle(source, work / "trt8", images, num=4, steps=4, progress=False)
    assert load_bundle(int8).flavour == "trt"
    counts = load_bundle(int8).manifest["quantization"]["graphs"]["decoder"]
    cfg = load_bundle(int8).config
    # 7 linear layers per layer in int8; the two attention products per layer stay float
    assert (counts["int8_matmuls"], counts["float_matmuls"]) == (7 * cfg.num_hidden_layers, 2 * cfg.num_hidden_layers)
    summary = _agreement(GraphBackend(source), GraphBackend(int8), eval_images)
    for key, threshold in THRESHOLDS.items():
        assert summary[key] >= threshold, (key, summary)


# bad input ---------------------------------------------------------------------------------


def test_refuses_what_it_cannot_calibrate(fp32_bundle: Path, tiny_checkpoint: Path, images: Path,
                                          work: Path, tmp_path: Path) -> None:
    from rexedge.export.bundle import export_bundle

    fp16 = export_bundle(tiny_checkpoint, work / "fp16", precision="fp16", progress=False)
    with pytest.raises(CalibrationError, match="fp16 bundle; calibrate an fp32 bundle"):
        quantize_bundle(fp16, tmp_path / "a", images, progress=False)
    int4 = export_bundle(tiny_checkpoint, work / "int4", weights="int4", progress=False)
    with pytest.raises(CalibrationError, match="int4 weights"):
        quantize_bundle(int4, tmp_path / "a", images, progress=False)
    vision_int8 = export_bundle(tiny_checkpoint, work / "vision-int8", vision_weights="int8", progress=False)
    with pytest.raises(CalibrationError, match="its vision encoder has int8 weights"):
        quantize_bundle(vision_int8, tmp_path / "a", images, progress=False)
    with pytest.raises(CalibrationError, match="no image files"):
        quantize_bundle(fp32_bundle, tmp_path / "b", tmp_path, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(CalibrationError, match="no image could be read"):
        quantize_bundle(fp32_bundle, tmp_path / "c", broken, progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
    with pytest.raises(CalibrationError, match="--num 0"):
        quantize_bundle(fp32_bundle, tmp_path / "d", images, num=0, progress=False)
    with pytest.raises(CalibrationError, match="--tasks"):
        quantize_bundle(fp32_bundle, tmp_path / "e", images, tasks=["detect"], progress=False)


def test_cli_calibrate(fp32_bundle: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    local = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, local)
    assert main(["calibrate", str(local), "--images", str(images), "--tasks", "detection,pointing", "keypoint",
                 "--num", "3", "--steps", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "decoder: 14 int8 MatMuls" in out and f"to {local}-int8" in out
    manifest = json.loads((tmp_path / "bundle-int8" / "manifest.json").read_text())
    assert manifest["quantization"]["tasks"] == ["detection", "pointing", "keypoint"]
    assert main(["calibrate", str(local), "--images", str(images), "--quiet"]) == 2  # BUNDLE-int8 exists
    err = capsys.readouterr().err
    assert err.startswith("rexedge calibrate: error: --out") and err.count("\n") == 1
