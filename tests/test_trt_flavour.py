"""The trt-flavour decoder graph (standard ops, KV in and returned) on onnxruntime against the compact model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rexedge.export.bundle import export_bundle
from rexedge.runtime.model.checkpoint import load_model
from rexedge.runtime.model.compact import KVCache
from rexedge.export.onnx.decoder import FLAVOURS, build_decoder_graph
from rexedge.export.onnx.graph import ExternalData
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.request.positions import decode_positions, rope_positions

RTOL = 1e-4
# the foundation commit: the ort-flavour decoder builder as it was before the trt flavour was added
BEFORE_TRT = "0ea4d5a"


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def trt_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("trt") / "bundle", flavour="trt", progress=False)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path):
    return load_model(tiny_checkpoint, dtype=torch.float32)


def run_trt_decoder(session: ort.InferenceSession, past: list[np.ndarray], embeds: np.ndarray,
                    positions: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """One call: past caches [1, KVH, P, D] in, hidden [T, H] and present caches [1, KVH, P+T, D] out (every key
    valid: one sequence has no holes)."""
    layers = len(past) // 2
    feeds = {"inputs_embeds": embeds[None], "position_ids": positions[:, None, :],
             "key_valid": np.ones((1, past[0].shape[2] + embeds.shape[0]), bool)}
    for i in range(layers):
        feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = past[2 * i], past[2 * i + 1]
    names = ["hidden_states"] + [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    hidden, *present = session.run(names, feeds)
    return hidden[0], present


def test_trt_decoder_prefill_and_steps_match_compact_model(trt_bundle: Path, model) -> None:
    cfg = model.config
    rng = np.random.default_rng()  # fresh inputs every run
    merged_h, merged_w = 3, 5
    ids = np.concatenate([rng.integers(0, 1000, 3), [cfg.vision_start_token_id],
                          np.full(merged_h * merged_w, cfg.image_token_id), [cfg.vision_end_token_id],
                          rng.integers(0, 1000, 7)]).astype(np.int64)
    positions, rope_delta = rope_positions(ids, cfg.image_token_id, cfg.vision_start_token_id, (merged_h, merged_w))
    embeds = rng.standard_normal((ids.size, cfg.hidden_size), np.float32) * 0.05

    session = ort.InferenceSession(str(trt_bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    cache = KVCache.allocate(cfg, 1, 64)

    def reference(step_embeds: np.ndarray, step_positions: np.ndarray, start: int) -> np.ndarray:
        with torch.no_grad():
            hidden = model.decode(torch.from_numpy(step_embeds[None]), torch.from_numpy(step_positions[:, None, :]),
                                  cache, torch.arange(start, start + step_embeds.shape[0]),
                                  kv_length=start + step_embeds.shape[0])
        return hidden[0].numpy()

    empty = np.full((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.nan, np.float32)
    hidden, present = run_trt_decoder(session, [empty] * (2 * cfg.num_hidden_layers), embeds, positions)
    assert hidden.shape == (ids.size, cfg.hidden_size)
    assert relative_error(hidden, reference(embeds, positions, 0)) < RTOL
    cached = ids.size
    for tokens in (1, 3, 1, 2, 1):
        step_embeds = rng.standard_normal((tokens, cfg.hidden_size), np.float32) * 0.05
        step_positions = decode_positions(cached, rope_delta, tokens)
        hidden, present = run_trt_decoder(session, present, step_embeds, step_positions)
        assert hidden.shape == (tokens, cfg.hidden_size)
        assert relative_error(hidden, reference(step_embeds, step_positions, cached)) < RTOL
        cached += tokens
        # present = past + the new tokens' keys/values, where the compact model put its own
        for layer in range(cfg.num_hidden_layers):
            assert present[2 * layer].shape == (1, cfg.num_key_value_heads, cached, cfg.head_dim)
            assert relative_error(present[2 * layer], cache.keys[layer][:, :, :cached].numpy()) < RTOL
            assert relative_error(present[2 * layer + 1], cache.values[layer][:, :, :cached].numpy()) < RTOL


def test_trt_flavour_uses_standard_operators_only(trt_bundle: Path) -> None:
    for name in ("vision.onnx", "decoder.onnx"):
        graph = onnx.load(str(trt_bundle / name), load_external_data=False)
        assert {n.domain for n in graph.graph.node} <= {""}
        assert [o.domain for o in graph.opset_import] == [""]
        assert graph.opset_import[0].version == 17
    decoder = onnx.load(str(trt_bundle / "decoder.onnx"), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in decoder.graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in decoder.graph.output}
    assert "seqlens_k" not in inputs and inputs["past_key_0"][2] == "past_length"
    assert outputs["present_value_1"][2] == "present_length"


def test_trt_bundle_manifest_has_optimization_profiles(trt_bundle: Path) -> None:
    bundle = load_bundle(trt_bundle)
    assert bundle.flavour == "trt"
    decoder = bundle.manifest["graphs"]["decoder"]
    profiles = {p["name"]: p["shapes"] for p in decoder["profiles"]}
    assert set(profiles) == {"prefill", "decode"}
    assert set(profiles["decode"]) == set(bundle.decoder.input_names())
    kvh, d = bundle.config.num_key_value_heads, bundle.config.head_dim
    assert profiles["prefill"]["past_key_0"] == {"min": [1, kvh, 0, d], "opt": [1, kvh, 0, d], "max": [1, kvh, 0, d]}
    decode_past = profiles["decode"]["past_value_1"]
    assert decode_past["min"][2] == 0 < decode_past["opt"][2] <= decode_past["max"][2]
    for shapes in profiles.values():
        for entry in shapes.values():
            assert all(lo <= mid <= hi for lo, mid, hi in zip(entry["min"], entry["opt"], entry["max"]))
    vision = bundle.manifest["graphs"]["vision"]["profiles"]
    assert [p["name"] for p in vision] == ["image"]
    patches = vision[0]["shapes"]["pixel_patches"]
    assert patches["min"] == [64, 1176] and patches["max"] == [10240, 1176] and patches["opt"] == [58 * 102, 1176]


def test_ort_flavour_graph_is_unchanged(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The ort flavour's graph equals, byte for byte, what the builder wrote before the trt flavour existed."""
    import subprocess

    previous = subprocess.run(["git", "show", f"{BEFORE_TRT}:export/onnx/decoder.py"], capture_output=True,
                              text=True, cwd=Path(__file__).parents[1])
    if previous.returncode != 0:
        pytest.skip(f"no git history with commit {BEFORE_TRT} (the builder before the trt flavour)")
    module_path = tmp_path / "previous_decoder.py"
    module_path.write_text(previous.stdout)
    spec = importlib.util.spec_from_file_location("previous_decoder", module_path)
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(old)
    finally:
        del sys.modules[spec.name]
    from rexedge.runtime.model.checkpoint import open_checkpoint

    cfg = open_checkpoint(tiny_checkpoint).config
    data = ExternalData(tmp_path / "weights.data")
    rng = np.random.default_rng()
    for name, shape in _decoder_shapes(cfg).items():
        data.add(name, rng.standard_normal(shape).astype(np.float32))
    data.close()
    for precision in ("fp32", "fp16"):
        new = build_decoder_graph(cfg, data.tensors, precision, "ort")
        assert new.SerializeToString() == old.build_decoder_graph(cfg, data.tensors, precision).SerializeToString()
    assert set(FLAVOURS) == {"ort", "trt"}


def _decoder_shapes(cfg) -> dict[str, tuple[int, ...]]:
    from rexedge.runtime.model.checkpoint import expected_tensor_shapes

    return {n: tuple(s)[::-1] if len(s) == 2 else tuple(s) for n, s in expected_tensor_shapes(cfg).items()
            if n.startswith("model.") and n != "model.embed_tokens.weight"}
