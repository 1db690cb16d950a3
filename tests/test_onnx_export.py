"""The exported ONNX graphs on onnxruntime against the compact torch model (fp32, 1e-4 relative)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rexedge.export.bundle import ExportError, export_bundle
from rexedge.runtime.backends.ort import FP16_ON_CPU
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.model.checkpoint import load_model
from rexedge.runtime.model.compact import KVCache
from rexedge.runtime.request.positions import decode_positions, rope_positions
from rexedge.runtime.request.vision_layout import vision_layout

RTOL = 1e-4


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def bundle_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("export") / "bundle", progress=False)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path):
    return load_model(tiny_checkpoint, dtype=torch.float32)


def vision_feeds(patches: np.ndarray, grid_h: int, grid_w: int) -> dict[str, np.ndarray]:
    layout = vision_layout(grid_h, grid_w)
    names = ("rotary_pos", "patch_order", "reverse_index", "window_gather", "window_valid", "window_unpad")
    return {"pixel_patches": patches, **{n: np.asarray(getattr(layout, n)) for n in names}}


@pytest.fixture(scope="module")
def trt_bundle_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("export_trt") / "bundle", flavour="trt",
                         progress=False)


# patch grids -> merged grids 5x3 (both sides off the 4-token window: a window of 3 real tokens
# out of 16), 9x4 (one side a multiple of 4: a whole padding window row), 7x11; N = 60, 144, 308
# patches, none a multiple of the 64-slot window batch
@pytest.mark.parametrize("grid", [(10, 6), (18, 8), (14, 22)])
@pytest.mark.parametrize("flavour", ["ort", "trt"])
def test_vision_graph_matches_compact_model(bundle_dir: Path, trt_bundle_dir: Path, model, flavour: str,
                                            grid: tuple[int, int]) -> None:
    """ort: MultiHeadAttention (flash path for the full blocks, masked window batch) and RotaryEmbedding;
    trt: the same computation in standard operators. Both against the compact model."""
    grid_h, grid_w = grid
    cfg = model.config
    patches = np.random.default_rng().standard_normal((grid_h * grid_w, cfg.patch_dim), np.float32)
    directory = bundle_dir if flavour == "ort" else trt_bundle_dir
    session = ort.InferenceSession(str(directory / "vision.onnx"), providers=["CPUExecutionProvider"])
    (embeds,) = session.run(["image_embeds"], vision_feeds(patches, grid_h, grid_w))
    with torch.no_grad():
        expected = model.encode_image(torch.from_numpy(patches), vision_layout(grid_h, grid_w)).numpy()
    assert embeds.shape == (grid_h * grid_w // 4, cfg.hidden_size)
    assert relative_error(embeds, expected) < RTOL


def test_vision_flavours_express_attention_as_documented(bundle_dir: Path, trt_bundle_dir: Path) -> None:
    cfg = load_bundle(bundle_dir).config
    ort_graph = onnx.load(str(bundle_dir / "vision.onnx"), load_external_data=False).graph
    by_op: dict[str, list[onnx.NodeProto]] = {}
    for node in ort_graph.node:
        by_op.setdefault(node.op_type, []).append(node)
    attention = by_op["MultiHeadAttention"]
    assert len(attention) == cfg.vision_depth and len(by_op["RotaryEmbedding"]) == 2 * cfg.vision_depth
    assert all(n.domain == "com.microsoft" for n in attention + by_op["RotaryEmbedding"])
    # full-attention blocks take no mask (ONNX Runtime's CPU flash path needs none); windowed ones do
    masked = [len(n.input) > 4 and n.input[4] != "" for n in attention]
    assert masked == [i not in cfg.fullatt_block_indexes for i in range(cfg.vision_depth)]
    assert "Softmax" not in by_op and "Transpose" not in by_op
    # the contrib outputs carry their type, so ONNX shape inference types everything downstream
    # (ONNX Runtime's quantizer only calibrates typed tensors: the attention projections' inputs)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(bundle_dir / "vision.onnx"), load_external_data=False))
    typed = {v.name for v in (*inferred.graph.value_info, *inferred.graph.input) if v.type.tensor_type.elem_type}
    assert all(n.input[0] in typed for n in inferred.graph.node if n.op_type == "MatMul")
    trt_graph = onnx.load(str(trt_bundle_dir / "vision.onnx"), load_external_data=False).graph
    assert {n.domain for n in trt_graph.node} == {""}


def run_decoder(session: ort.InferenceSession, kv: list[ort.OrtValue], embeds: np.ndarray, positions: np.ndarray,
                cached: int) -> np.ndarray:
    """One decoder call with the shared KV buffers bound as both past and present."""
    tokens = embeds.shape[0]
    binding = session.io_binding()
    binding.bind_output("hidden_states")
    binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds[None]))
    binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions[:, None, :]))
    binding.bind_cpu_input("seqlens_k", np.array([cached + tokens - 1], np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(cached + tokens, np.int32))
    for i in range(len(kv) // 2):
        for kind, value in (("key", kv[2 * i]), ("value", kv[2 * i + 1])):
            binding.bind_ortvalue_input(f"past_{kind}_{i}", value)
            binding.bind_ortvalue_output(f"present_{kind}_{i}", value)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0][0]


def test_decoder_graph_prefill_and_steps_match_compact_model(bundle_dir: Path, model) -> None:
    cfg = model.config
    rng = np.random.default_rng(7)
    merged_h, merged_w = 3, 5
    ids = np.concatenate([rng.integers(0, 1000, 4), [cfg.vision_start_token_id],
                          np.full(merged_h * merged_w, cfg.image_token_id), [cfg.vision_end_token_id],
                          rng.integers(0, 1000, 6)]).astype(np.int64)
    positions, rope_delta = rope_positions(ids, cfg.image_token_id, cfg.vision_start_token_id, (merged_h, merged_w))
    embeds = rng.standard_normal((ids.size, cfg.hidden_size), np.float32) * 0.05

    capacity = 48
    session = ort.InferenceSession(str(bundle_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    kv_shape = (1, cfg.num_key_value_heads, capacity, cfg.head_dim)
    kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros(kv_shape, np.float32)) for _ in range(2 * cfg.num_hidden_layers)]
    cache = KVCache.allocate(cfg, 1, capacity)

    def reference(step_embeds: np.ndarray, step_positions: np.ndarray, start: int) -> np.ndarray:
        with torch.no_grad():
            hidden = model.decode(torch.from_numpy(step_embeds[None]), torch.from_numpy(step_positions[:, None, :]),
                                  cache, torch.arange(start, start + step_embeds.shape[0]),
                                  kv_length=start + step_embeds.shape[0])
        return hidden[0].numpy()

    hidden = run_decoder(session, kv, embeds, positions, 0)
    assert hidden.shape == (ids.size, cfg.hidden_size)
    assert relative_error(hidden, reference(embeds, positions, 0)) < RTOL
    cached = ids.size
    for tokens in (1, 1, 3, 1, 2):
        step_embeds = rng.standard_normal((tokens, cfg.hidden_size), np.float32) * 0.05
        step_positions = decode_positions(cached, rope_delta, tokens)
        hidden = run_decoder(session, kv, step_embeds, step_positions, cached)
        assert relative_error(hidden, reference(step_embeds, step_positions, cached)) < RTOL
        cached += tokens
    # the new keys/values were written into the bound buffers, where the model put its own
    for layer in range(cfg.num_hidden_layers):
        written = kv[2 * layer].numpy()[:, :, :cached]
        assert relative_error(written, cache.keys[layer][:, :, :cached].numpy()) < RTOL
        assert not kv[2 * layer].numpy()[:, :, cached:].any()


def test_graphs_keep_weights_in_external_data(bundle_dir: Path) -> None:
    for name in ("vision.onnx", "decoder.onnx"):
        graph = onnx.load(str(bundle_dir / name), load_external_data=False)
        external = {t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
        inline = [t for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        assert locations == {name + ".data"}
        assert all(n.startswith(("model.", "visual.")) for n in external)
        # what stays inline are small constants (shapes, axes, frequency tables)
        assert all(np.prod(t.dims) <= 64 for t in inline)
    decoder = onnx.load(str(bundle_dir / "decoder.onnx"), load_external_data=False)
    attention = [n for n in decoder.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == load_bundle(bundle_dir).config.num_hidden_layers
    assert all(n.domain == "com.microsoft" for n in attention)


def test_fp16_export_runs_close_to_fp32(tiny_checkpoint: Path, bundle_dir: Path, tmp_path: Path) -> None:
    fp16 = export_bundle(tiny_checkpoint, tmp_path / "fp16", precision="fp16", progress=False)
    assert load_bundle(fp16).precision == "fp16"
    assert (fp16 / "decoder.onnx.data").stat().st_size < (bundle_dir / "decoder.onnx.data").stat().st_size
    patches = np.random.default_rng(3).standard_normal((6 * 10, 1176), np.float32)
    outputs = [ort.InferenceSession(str(d / "vision.onnx"), providers=["CPUExecutionProvider"])
               .run(["image_embeds"], vision_feeds(patches, 6, 10))[0] for d in (bundle_dir, fp16)]
    # half precision through 4 blocks and the merger: agreement to a few parts in a thousand
    assert relative_error(outputs[1], outputs[0]) < 2e-2
    # on a CPU an fp16 bundle says once, in one line, that it is for GPUs and what to export instead
    for bundle, warned in ((fp16, True), (bundle_dir, False)):
        loaded = subprocess.run([sys.executable, "-P", "-c", f"from rexedge.runtime.backends import load_backend\n"
                                 f"load_backend('ort', {str(bundle)!r})"], capture_output=True, text=True)
        assert loaded.returncode == 0, loaded.stderr
        lines = loaded.stderr.splitlines()
        assert lines == ([FP16_ON_CPU] if warned else [])


def test_export_refuses_bad_arguments(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="precision 'int3'"):
        export_bundle(tiny_checkpoint, tmp_path / "a", precision="int3", progress=False)
    with pytest.raises(ExportError, match="flavour 'tensorrt'.*'ort'"):
        export_bundle(tiny_checkpoint, tmp_path / "b", flavour="tensorrt", progress=False)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_bundle(tiny_checkpoint, occupied, progress=False)
    assert (occupied / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
