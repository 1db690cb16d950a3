"""``rexedge prepack``: ONNX Runtime's prepacked graphs for this CPU, and the ort backend loading them."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rexedge.export.bundle import export_bundle
from rexedge.export.prepack import PrepackError, prepack_bundle, remove_prepacked
from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.ort import OrtBackend
from rexedge.runtime.backends.prepacked import HEAD_GRAPH, cpu_target, prepacked_graphs
from rexedge.runtime.bundle import BundleError, load_bundle
from rexedge.runtime.request.positions import decode_positions
from rexedge.runtime.request.preprocess import preprocess

GRAPHS = {schema.VISION, schema.DECODER, HEAD_GRAPH}


@pytest.fixture(scope="module")
def plain(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("prepack") / "int4", weights="int4", progress=False)


@pytest.fixture(scope="module")
def packed(plain: Path) -> Path:
    copy = plain.with_name("int4-prepacked")
    shutil.copytree(plain, copy)
    prepack_bundle(copy, progress=False)
    return copy


def _outputs(backend: OrtBackend, seed: int) -> list[np.ndarray]:
    """Image embeddings, the prefill's hidden state, 5 steps' hidden states and the head graph's logits."""
    rng = np.random.default_rng(seed)
    cfg = backend.config
    image = preprocess((rng.random((70, 130, 3)) * 255).astype(np.uint8), cfg=cfg)
    out = [backend.encode_image(image).copy()]
    prompt = 13
    out.append(backend.prefill(rng.standard_normal((prompt, cfg.hidden_size)).astype(np.float32),
                               np.tile(np.arange(prompt), (3, 1))).copy())
    for token in rng.integers(0, cfg.vocab_size, 5):
        hidden = backend.step(np.array([token]), decode_positions(backend.slot_length(0), 0)).copy()
        out += [hidden, backend._head.logits(hidden).copy()]
    return out


def test_prepacked_graphs_are_recorded_and_checked_with_the_bundle(packed: Path) -> None:
    bundle = load_bundle(packed)
    (record,) = bundle.manifest[schema.PREPACKED]
    assert record["target"] == cpu_target() and set(record[schema.FILES]) == GRAPHS
    for file in record[schema.FILES].values():
        for name in (file, file + ".data"):   # listed, so the bundle's hash check covers them
            assert name in bundle.manifest[schema.FILES] and (packed / name).is_file()
    data = packed / record[schema.FILES][schema.DECODER]
    data = data.with_name(data.name + ".data")
    with open(data, "r+b") as fh:   # one byte altered: the bundle is refused, never run on it
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 1]))
    try:
        with pytest.raises(BundleError, match="altered"):
            load_bundle(packed)
    finally:
        with open(data, "r+b") as fh:
            fh.write(first)
    load_bundle(packed)


def test_prepacked_sessions_give_the_plain_sessions_outputs(plain: Path, packed: Path) -> None:
    reference = OrtBackend(plain)
    fast = OrtBackend(packed)
    assert reference.prepacked == {} and set(fast.prepacked) == GRAPHS
    seed = int(np.random.default_rng().integers(1 << 31))
    for want, got in zip(_outputs(reference, seed), _outputs(fast, seed), strict=True):
        np.testing.assert_array_equal(got, want)


def test_another_cpu_or_changed_graphs_do_not_use_the_record(packed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rexedge.runtime.backends.prepacked.cpu_target", lambda: "riscv64-000000000000.ort0")
    assert OrtBackend(packed).prepacked == {}
    monkeypatch.undo()
    bundle = load_bundle(packed)
    manifest = json.loads(json.dumps(bundle.manifest))
    assert prepacked_graphs(bundle)
    for changed in (bundle.decoder.file, bundle.decoder.data):   # as if the graph or its weights had been replaced
        altered = json.loads(json.dumps(manifest))
        altered[schema.FILES][changed]["sha256"] = "0" * 64
        assert not prepacked_graphs(dataclasses.replace(bundle, manifest=altered))


def test_a_trt_flavour_bundle_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    trt = export_bundle(tiny_checkpoint, tmp_path / "trt", flavour="trt", progress=False)
    with pytest.raises(PrepackError, match="'trt' bundle"):
        prepack_bundle(trt, progress=False)


def test_remove_takes_the_record_and_files_out(packed: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(packed, tmp_path / "copy"))
    files = set(p.name for p in copy.iterdir())
    removed = remove_prepacked(copy, progress=False)
    assert len(removed) == 2 * len(GRAPHS) and set(removed) <= files
    assert set(p.name for p in copy.iterdir()) == files - set(removed)
    bundle = load_bundle(copy)   # still whole: nothing listed is missing
    assert bundle.manifest[schema.PREPACKED] == [] and not set(removed) & set(bundle.manifest[schema.FILES])
    assert OrtBackend(copy).prepacked == {}
