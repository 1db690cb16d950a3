"""Engine naming and records, the mismatch and missing-dependency errors, and (with TensorRT + a GPU) the trt backend."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from rexedge.export.bundle import export_bundle
from rexedge.export.tensorrt.engine import build_engines
from rexedge.runtime.backends import BackendError, load_backend
from rexedge.runtime.backends.trt_engines import EngineError, Target, engine_file, engine_record, select_engines
from rexedge.runtime.bundle import MANIFEST, BundleError, load_bundle, update_manifest
from rexedge.runtime.cli import main

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
ORIN = Target("NVIDIA Jetson AGX Orin", (8, 7), "10.3.0")
DESKTOP = Target("NVIDIA GeForce RTX 4090", (8, 9), "10.7.0")


@pytest.fixture()
def trt_bundle(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path / "bundle", flavour="trt", progress=False)


def record_fake_engines(bundle_dir: Path, target: Target, precision: str, rng: np.random.Generator) -> dict:
    """What build_engines does after TensorRT returns: engine files in the bundle, a record, new hashes."""
    record = engine_record(target, precision, {"vision": ["image"], "decoder": ["prefill", "decode"]},
                           {"workspace_gb": None})
    for name in record["files"].values():
        (bundle_dir / name).write_bytes(rng.bytes(int(rng.integers(100, 1000))))
    previous = load_bundle(bundle_dir).manifest.get("engines", [])
    update_manifest(bundle_dir, {"engines": previous + [record]}, added_files=record["files"].values())
    return record


def test_engine_names_say_gpu_compute_capability_tensorrt_and_precision() -> None:
    assert ORIN.slug == "nvidia-jetson-agx-orin.sm87.trt10.3.0"
    assert engine_file("decoder", ORIN, "fp16") == "decoder.nvidia-jetson-agx-orin.sm87.trt10.3.0.fp16.engine"
    assert engine_file("vision", DESKTOP, "int8") == "vision.nvidia-geforce-rtx-4090.sm89.trt10.7.0.int8.engine"
    assert Target("  Tesla/T4 (PCIe) ", (7, 5), "10.3.0").slug == "tesla-t4-pcie.sm75.trt10.3.0"


def test_recorded_engines_are_found_and_hash_checked(trt_bundle: Path) -> None:
    rng = np.random.default_rng()
    orin = record_fake_engines(trt_bundle, ORIN, "fp16", rng)
    desktop = record_fake_engines(trt_bundle, DESKTOP, "fp16", rng)
    bundle = load_bundle(trt_bundle)  # digest and every file's sha256, engines included
    assert select_engines(bundle, ORIN, "fp16") == orin
    assert select_engines(bundle, DESKTOP, "fp16") == desktop
    assert all(name in bundle.manifest["files"] for name in orin["files"].values())
    # an engine altered after it was recorded is refused like any other bundle file
    victim = trt_bundle / orin["files"]["decoder"]
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 differs"):
        load_bundle(trt_bundle)


def test_engines_built_elsewhere_are_a_clear_error(trt_bundle: Path) -> None:
    record_fake_engines(trt_bundle, ORIN, "fp16", np.random.default_rng())
    bundle = load_bundle(trt_bundle)
    newer_tensorrt = Target(ORIN.gpu, ORIN.compute_capability, "10.7.0")
    for target in (DESKTOP, newer_tensorrt):
        with pytest.raises(EngineError, match=r"built for NVIDIA Jetson AGX Orin \(compute capability 8\.7\) with "
                                              r"TensorRT 10\.3\.0.*this machine has .*rexedge build") as caught:
            select_engines(bundle, target, "fp16")
        assert target.describe() in str(caught.value)
    with pytest.raises(EngineError, match="no int8 TensorRT engines"):
        select_engines(bundle, ORIN, "int8")


def test_update_manifest_refuses_an_altered_manifest(trt_bundle: Path) -> None:
    with pytest.raises(BundleError, match="nope.engine: cannot be listed in manifest.json, it does not exist"):
        update_manifest(trt_bundle, {"engines": []}, added_files=["nope.engine"])
    path = trt_bundle / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["precision"] = "fp16"
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="altered after export"):
        update_manifest(trt_bundle, {"engines": []})


def test_build_checks_the_bundle_before_tensorrt(tiny_checkpoint: Path, trt_bundle: Path, tmp_path: Path) -> None:
    ort_bundle = export_bundle(tiny_checkpoint, tmp_path / "ort", flavour="ort", progress=False)
    with pytest.raises(EngineError, match="'ort' flavour.*--flavour trt"):
        build_engines(ort_bundle, "fp16", progress=False)
    with pytest.raises(EngineError, match="no QuantizeLinear/DequantizeLinear nodes.*rexedge calibrate"):
        build_engines(trt_bundle, "int8", progress=False)
    with pytest.raises(EngineError, match="goes with --precision int8"):
        build_engines(trt_bundle, "fp16", calib=trt_bundle, progress=False)
    with pytest.raises(EngineError, match="precision 'int4'"):
        build_engines(trt_bundle, "int4", progress=False)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown when TensorRT is missing")
def test_missing_tensorrt_says_what_to_install(trt_bundle: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(EngineError, match=r"pip install rexedge\[tensorrt\].*python3-libnvinfer"):
        build_engines(trt_bundle, "fp16", progress=False)
    with pytest.raises(BackendError, match=r"trt backend: TensorRT is not installed.*rexedge\[tensorrt\]"):
        load_backend("trt", trt_bundle, device="cuda")
    assert main(["build", str(trt_bundle), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rexedge build: error: TensorRT is not installed") and "\n" not in err


def test_trt_backend_needs_a_cuda_device(trt_bundle: Path) -> None:
    with pytest.raises(BackendError, match="device 'cpu' is not a CUDA device"):
        load_backend("trt", trt_bundle)


# ---------------------------------------------------------------------------- with TensorRT and a GPU


def _gpu_ready() -> bool:
    if not HAS_TENSORRT:
        return False
    try:
        import torch
    except ImportError:
        return importlib.util.find_spec("cuda") is not None
    return torch.cuda.is_available()


def host(hidden) -> np.ndarray:
    """A copy on the host of a hidden state the trt backend returns (a torch tensor with the device head)."""
    return hidden.detach().float().cpu().numpy() if hasattr(hidden, "detach") else np.array(hidden)


@pytest.mark.skipif(not _gpu_ready(), reason="needs TensorRT and a CUDA GPU")
def test_trt_backend_matches_ort_on_a_gpu(tiny_checkpoint: Path, trt_bundle: Path, tmp_path: Path) -> None:
    from rexedge.runtime.request.positions import decode_positions, rope_positions
    from rexedge.runtime.request.preprocess import preprocess

    record = build_engines(trt_bundle, "fp16", timing_cache=tmp_path / "timing.cache", progress=False)
    assert all((trt_bundle / f).is_file() for f in record["files"].values())
    trt_backend = load_backend("trt", trt_bundle, device="cuda", max_context=96)
    ort_bundle = export_bundle(tiny_checkpoint, tmp_path / "ort", progress=False)
    reference = load_backend("ort", ort_bundle, max_context=96)
    cfg = reference.config
    rng = np.random.default_rng()
    image = preprocess((rng.random((90, 150, 3)) * 255).astype(np.uint8), cfg=cfg)
    expected = reference.encode_image(image)
    got = trt_backend.encode_image(image)
    # fp16 engines against the fp32 reference: agreement to a few parts in a hundred
    assert np.abs(got - expected).max() / np.abs(expected).max() < 3e-2

    ids = rng.integers(0, 1000, 20).astype(np.int64)
    positions, rope_delta = rope_positions(ids, cfg.image_token_id, cfg.vision_start_token_id, (1, 1))
    embeds = reference.embed_table[ids]
    a = reference.prefill(embeds, positions).copy()
    b = host(trt_backend.prefill(embeds, positions))
    assert np.abs(b - a).max() / np.abs(a).max() < 3e-2
    cached = ids.size
    for k in (1, 3, 1):
        tokens = rng.integers(0, 1000, k).astype(np.int64)
        step_positions = decode_positions(cached, rope_delta, k)
        a = reference.step(tokens, step_positions).copy()
        b = host(trt_backend.step(tokens, step_positions))
        assert np.abs(b - a).max() / np.abs(a).max() < 3e-2
        cached += k
    assert trt_backend.cache_length == reference.cache_length == cached
