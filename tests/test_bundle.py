"""The bundle: what `rexedge export` writes, and the checks made when it is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from rexedge.export.bundle import export_bundle
from rexedge.runtime.bundle import FORMAT_VERSION, BundleError, load_bundle, manifest_digest, sha256_file
from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.model.checkpoint import checkpoint_digest
from rexedge.runtime.request.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def bundle_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "bundle", progress=False)


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "copy"))


def checkpoint_embedding(checkpoint: Path) -> np.ndarray:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.embed_tokens.weight"]
    return load_file(str(checkpoint / shard))["model.embed_tokens.weight"]


def test_round_trip(tiny_checkpoint: Path, bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.config == RexOmniConfig.from_json(tiny_checkpoint)
    assert bundle.precision == "fp32" and bundle.flavour == "ort"
    assert bundle.manifest["source"]["digest"] == checkpoint_digest(tiny_checkpoint)

    embed = bundle.load_embed_table()
    assert isinstance(embed, np.memmap) and embed.dtype == np.float32
    np.testing.assert_array_equal(embed, checkpoint_embedding(tiny_checkpoint))

    original = Tokenizer.from_dir(tiny_checkpoint)
    loaded = bundle.load_tokenizer()
    assert loaded.ids == original.ids
    text = "Detect cup, door handle. <|im_end|> <5> None"
    assert loaded.encode_text(text) == original.encode_text(text)
    start, stop = bundle.coord_rows
    assert (start, stop) == (original.ids.coord_start, original.ids.coord_start + 1000)
    assert [original.decode([i]) for i in (start, stop - 1)] == ["<0>", "<999>"]

    listed = bundle.manifest["files"]
    on_disk = {p.name for p in bundle_dir.iterdir()} - {"manifest.json"}
    assert set(listed) == on_disk
    assert all(listed[name]["sha256"] == sha256_file(bundle_dir / name) for name in listed)


def test_manifest_describes_graphs(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    cfg = bundle.config
    decoder = {i["name"]: i for i in bundle.decoder.inputs}
    assert decoder["inputs_embeds"]["shape"] == ["batch", "tokens", cfg.hidden_size]
    assert decoder["position_ids"] == {"name": "position_ids", "dtype": "int64", "shape": [3, "batch", "tokens"]}
    assert decoder["past_key_0"]["shape"] == ["batch", cfg.num_key_value_heads, "kv_capacity", cfg.head_dim]
    assert {o["name"] for o in bundle.decoder.outputs} >= {"hidden_states", "present_value_1"}
    assert bundle.vision.input_names()[0] == "pixel_patches"
    assert bundle.vision.outputs[0]["shape"] == ["image_tokens", cfg.hidden_size]
    # Rex-Omni's pixel budget: 64 .. 10240 patches of 14 x 14
    assert bundle.vision.dims["patches"] == (64, 10240)
    assert bundle.decoder.dims["tokens"] == (1, cfg.max_position_embeddings)


def test_changed_byte_in_a_graph_is_refused(bundle_copy: Path) -> None:
    data = bundle_copy / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data: sha256 differs"):
        load_bundle(bundle_copy)


def test_hashes_of_unchanged_files_are_remembered_and_a_changed_file_is_hashed_again(
        bundle_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rexedge.runtime.hash_cache as hash_cache

    monkeypatch.setenv("REXEDGE_CACHE_DIR", str(tmp_path / "cache"))
    load_bundle(bundle_copy)                      # hashes every file once and remembers
    hashed: list[Path] = []
    real = hash_cache.sha256_file
    monkeypatch.setattr(hash_cache, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    load_bundle(bundle_copy)
    assert hashed == []
    # one byte changed in place, same size, modification time set back: the change time still differs
    data = bundle_copy / "decoder.onnx.data"
    before = data.stat()
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data: sha256 differs"):
        load_bundle(bundle_copy)
    assert hashed == ["decoder.onnx.data"]


def test_an_unwritable_hash_cache_only_costs_hashing(bundle_copy: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("REXEDGE_CACHE_DIR", str(blocker / "cache"))   # a directory under a file: never creatable
    assert load_bundle(bundle_copy).config.hidden_size == 64
    assert load_bundle(bundle_copy).config.hidden_size == 64


def test_changed_byte_in_manifest_is_refused(bundle_copy: Path) -> None:
    manifest = bundle_copy / "manifest.json"
    text = manifest.read_text()
    assert '"hidden_size": 64' in text
    manifest.write_text(text.replace('"hidden_size": 64', '"hidden_size": 65', 1))
    with pytest.raises(BundleError, match=r"manifest\.json: altered after export"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: missing from the bundle"):
        load_bundle(bundle_copy)


def test_truncated_file_is_refused_without_hashing(bundle_copy: Path) -> None:
    data = bundle_copy / "vision.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"vision\.onnx\.data: \d+ bytes"):
        load_bundle(bundle_copy, verify_hashes=False)


def test_other_format_version_is_refused(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest["manifest_sha256"] = manifest_digest(manifest)  # a consistent manifest, just newer
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        load_bundle(bundle_copy)


def test_not_a_bundle(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(tmp_path / "nothing")
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_bundle(tiny_checkpoint)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rexedge.runtime.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_export_command(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    result = run_cli("export", str(tiny_checkpoint), "--out", str(out), "--dtype", "fp16")
    assert result.returncode == 0, result.stderr
    assert "export: weights" in result.stderr  # tqdm progress
    assert "fp16 bundle (ort decoder" in result.stdout and str(out) in result.stdout
    assert load_bundle(out).precision == "fp16"

    again = run_cli("export", str(tiny_checkpoint), "--out", str(out), "--quiet")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [f"rexedge export: error: {out}: already exists and is not an empty "
                                                 f"directory"]


def test_loading_a_bundle_with_ort_never_imports_torch(bundle_dir: Path) -> None:
    code = (
        "import sys\n"
        "from rexedge.runtime.backends import load_backend\n"
        f"backend = load_backend('ort', {str(bundle_dir)!r}, max_context=16)\n"
        "import numpy as np\n"
        "backend.prefill(np.zeros((3, backend.config.hidden_size), np.float32), np.tile(np.arange(3), (3, 1)))\n"
        "backend.step(np.array([5]), np.full((3, 1), 3))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'safetensors', 'transformers'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_bundle_carries_the_pixel_range_its_model_was_trained_for(tiny_checkpoint: Path, bundle_dir: Path,
                                                                    tmp_path: Path) -> None:
    from rexedge.runtime.api import RexOmni
    from rexedge.runtime.request.preprocess import MAX_PIXELS, MIN_PIXELS

    own = (20 * 28 * 28, 40 * 28 * 28)
    bundle = export_bundle(tiny_checkpoint, tmp_path / "small", progress=False, pixels=own)
    assert load_bundle(bundle).pixels == own and load_bundle(bundle_dir).pixels is None
    image = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    seen = []
    for model, (low, high) in ((RexOmni(bundle, max_tokens=4), own),
                               (RexOmni(bundle, max_tokens=4, max_pixels=60 * 28 * 28), (own[0], 60 * 28 * 28)),
                               (RexOmni(bundle_dir, max_tokens=4), (MIN_PIXELS, MAX_PIXELS))):
        assert (model.min_pixels, model.max_pixels) == (low, high)
        [result] = model.inference(image, task="detection", categories=["cup"])
        width, height = result["resized_size"]
        seen.append([width, height])
        # the 640 x 480 image resized into the range (each side to a multiple of 28, the aspect kept)
        assert width * height <= high and (width * height >= low or high == MAX_PIXELS)
        assert (width, height) == (644, 476) if high == MAX_PIXELS else width * height > 0.7 * high

    # `rexedge prompt` shows the sizes the model sees: the bundle's range unless told otherwise
    for argv, expected in (((), seen[0]), (("--max-pixels", str(60 * 28 * 28)), seen[1])):
        shown = run_cli("prompt", "--model", str(bundle), "--task", "detection", "--categories", "cup",
                        "--image-size", "640x480", "--json", *argv)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["resized_size"] == expected

    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["pixels"] = {"min_pixels": 4000, "max_pixels": 3000}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"pixels .*0 < min_pixels <= max_pixels"):
        load_bundle(bundle)
    alone = run_cli("export", str(tiny_checkpoint), "--out", str(tmp_path / "alone"), "--min-pixels", "3000")
    assert alone.returncode == 2 and "--min-pixels and --max-pixels go together" in alone.stderr
