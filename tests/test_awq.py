"""AutoAWQ checkpoints (the published Rex-Omni-AWQ's format): read exactly, exported by repacking, or refused.

The reference is AutoAWQ itself (tests/awq_reference.py): its ``WQLinear_GEMM.from_linear`` packs
the tiny checkpoints and its ``dequantize_gemm`` dequantizes them. "The model on the dequantized
weights" is the compact model loaded from a float checkpoint holding AutoAWQ's dequantization.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from awq_reference import CONFIG, reference_weights, write_awq_checkpoint
from safetensors.torch import save_file
from test_api import random_image
from test_nbits import _dequantize, _hidden_states, _max_relative, _nbits_nodes, _random_steps
from test_trt_weights import dq_weights, trt_hidden_states

from rexedge.export.bundle import ExportError, export_bundle
from rexedge.export.onnx.nbits import NBitsWeights
from rexedge.export.tensorrt.ops import check_graph_file
from rexedge.runtime.api import RexOmni
from rexedge.runtime.bundle import load_bundle
from rexedge.runtime.model.awq import AwqWeight, QuantizationError
from rexedge.runtime.model.checkpoint import CheckpointError, load_model, open_checkpoint

LAYERS = 7 * CONFIG.num_hidden_layers   # q, k, v, o, gate, up, down per decoder layer
_AUX = ("vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def awq_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_awq_checkpoint(tmp_path_factory.mktemp("awq") / "checkpoint")


@pytest.fixture(scope="module")
def dequantized_checkpoint(awq_checkpoint: Path) -> Path:
    """A float checkpoint of AutoAWQ's dequantization of ``awq_checkpoint`` (float32), nothing quantized."""
    out = awq_checkpoint.with_name("dequantized")
    out.mkdir()
    save_file({k: v.contiguous() for k, v in reference_weights(awq_checkpoint).items()}, out / "model.safetensors")
    config = json.loads((awq_checkpoint / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    for aux in _AUX:
        shutil.copy(awq_checkpoint / aux, out / aux)
    return out


@pytest.fixture(scope="module")
def exact_bundle(awq_checkpoint: Path) -> Path:
    """accuracy_level 1: MatMulNBits multiplies in float32, so the graph is the dequantized model up to rounding."""
    return export_bundle(awq_checkpoint, awq_checkpoint.with_name("bundle-exact"), progress=False,
                         nbits_options={"accuracy_level": 1})


@pytest.fixture(scope="module")
def trt_bundle(awq_checkpoint: Path) -> Path:
    return export_bundle(awq_checkpoint, awq_checkpoint.with_name("bundle-trt"), flavour="trt", progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantized_weights_equal_autoawq(awq_checkpoint: Path, dtype: torch.dtype) -> None:
    want = reference_weights(awq_checkpoint, dtype)
    checkpoint = open_checkpoint(awq_checkpoint)
    layers = 0
    for name, tensor, _ in checkpoint.iter_tensors(awq_packed=True):
        if isinstance(tensor, AwqWeight):
            layers += 1
            got = tensor.dequantize(dtype)
            assert got.dtype == want[name].dtype and torch.equal(got, want[name]), name
    assert layers == LAYERS


def test_torch_backend_loads_an_awq_checkpoint(awq_checkpoint: Path, dequantized_checkpoint: Path) -> None:
    model = load_model(awq_checkpoint, dtype=torch.float32)
    reference = load_model(dequantized_checkpoint, dtype=torch.float32)
    state, want = model.state_dict(), reference.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in state)
    # the same answer end to end (exact decoding: full vocabulary, greedy)
    image = random_image(3)
    got = RexOmni(awq_checkpoint, "torch", decoding="exact", max_tokens=40).inference(
        image, task="detection", categories=["cup", "dog"])[0]
    expected = RexOmni(dequantized_checkpoint, "torch", decoding="exact", max_tokens=40).inference(
        image, task="detection", categories=["cup", "dog"])[0]
    assert got["raw_output"] == expected["raw_output"] and got["output_token_ids"] == expected["output_token_ids"]


def test_bundle_keeps_the_awq_integers(awq_checkpoint: Path, exact_bundle: Path) -> None:
    """Each MatMulNBits node, read by the operator's documented formula, is AutoAWQ's dequantization exactly."""
    want = reference_weights(awq_checkpoint)
    graph, nodes = _nbits_nodes(exact_bundle)
    assert len(nodes) == LAYERS
    for node in nodes:
        name = node.input[1].removesuffix(".nbits")
        attrs = {a.name: a.i for a in node.attribute}
        assert (attrs["bits"], attrs["block_size"], len(node.input)) == (4, 128, 4)
        np.testing.assert_array_equal(_dequantize(graph, node, exact_bundle), want[name].numpy(), err_msg=name)
    entry = load_bundle(exact_bundle).decoder.weights
    assert (entry["format"], entry["origin"], entry["block_size"], entry["symmetric"]) == ("int4", "awq", 128, False)
    assert entry["quantized"] == sorted(n.input[1].removesuffix(".nbits") for n in nodes)
    assert load_bundle(exact_bundle).vision.weights is None


@pytest.mark.parametrize("k, n", [(384, 72), (256, 40), (128, 8)])
def test_repacking_reproduces_onnxruntime_bytes(k: int, n: int) -> None:
    """Integers ONNX Runtime's own quantizer chose, repacked as an AWQ layer's would be: the same bytes as its
    MatMulNBits layout (odd and even block counts: zero points padded per column)."""
    rng = np.random.default_rng()
    weight = rng.standard_normal((k, n)).astype(np.float32)
    ort_arrays = NBitsWeights("int4").quantize("w", weight)
    blocks = k // 128
    packed = ort_arrays["w.nbits"]
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k).T
    zero_bytes = ort_arrays["w.zero_points"].reshape(n, -1)
    zeros = np.stack([zero_bytes & 0x0F, zero_bytes >> 4], axis=-1).reshape(n, -1)[:, :blocks].T
    scales = ort_arrays["w.scales"].reshape(n, blocks).T
    repacked = NBitsWeights("int4", origin="awq").repack("w", np.ascontiguousarray(q), np.ascontiguousarray(zeros),
                                                         np.ascontiguousarray(scales))
    assert repacked.keys() == ort_arrays.keys()
    for name, array in ort_arrays.items():
        assert repacked[name].dtype == array.dtype and np.array_equal(repacked[name], array), name


def test_bundle_matches_the_model_on_dequantized_weights(dequantized_checkpoint: Path, exact_bundle: Path) -> None:
    model = load_model(dequantized_checkpoint, dtype=torch.float32)
    got, want = _hidden_states(model, exact_bundle, _random_steps(model.config.hidden_size))
    assert _max_relative(got, want) <= 1e-4


def test_export_command_on_an_awq_checkpoint(awq_checkpoint: Path, dequantized_checkpoint: Path,
                                            tmp_path: Path) -> None:
    """``rexedge export AWQ --out B``: an int4 bundle with the shipped settings, said so in one line. Its
    kernel also quantizes the activations (accuracy_level 4): within the 10% that test_nbits measures for it."""
    out = tmp_path / "bundle"
    done = subprocess.run([sys.executable, "-P", "-m", "rexedge.runtime.cli", "export", str(awq_checkpoint),
                           "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "int4 decoder weights (awq)" in done.stdout
    entry = load_bundle(out).decoder.weights
    assert (entry["origin"], entry["accuracy_level"], len(entry["quantized"])) == ("awq", 4, LAYERS)
    model = load_model(dequantized_checkpoint, dtype=torch.float32)
    got, want = _hidden_states(model, out, _random_steps(model.config.hidden_size))
    assert (np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)).max() <= 0.1


@pytest.mark.parametrize("optimized", [False, True], ids=["dq-kernel", "fused"])
def test_trt_flavour_bundle_of_an_awq_checkpoint(awq_checkpoint: Path, exact_bundle: Path, trt_bundle: Path,
                                                 optimized: bool) -> None:
    """The trt flavour repacks the same integers into blocked DequantizeLinear; with AWQ's fp16 scales every
    product is exact in float32, so the weights equal AutoAWQ's dequantization bit for bit."""
    bundle = trt_bundle
    assert check_graph_file(bundle / "decoder.onnx") == []
    entry = load_bundle(bundle).decoder.weights
    assert (entry["op"], entry["origin"], entry["block_size"], len(entry["quantized"])) == (
        "DequantizeLinear", "awq", 128, LAYERS)
    want = reference_weights(awq_checkpoint)
    got = dq_weights(bundle)
    assert sorted(got) == entry["quantized"]
    for name, weight in got.items():
        np.testing.assert_array_equal(weight, want[name].numpy(), err_msg=name)
    steps = _random_steps(CONFIG.hidden_size)
    reference, _ = _hidden_states(load_model(awq_checkpoint, dtype=torch.float32), exact_bundle, steps)
    hidden = trt_hidden_states(bundle, steps, optimized)
    assert float(np.abs(hidden - reference).max() / np.abs(reference).max()) <= 1e-4


def _config_only(awq_checkpoint: Path, out: Path, **changes: object) -> Path:
    """The AWQ checkpoint's config.json (``quantization_config`` changed) beside shards that are not safetensors:
    a refusal that reads them first fails differently."""
    out.mkdir()
    config = json.loads((awq_checkpoint / "config.json").read_text())
    config["quantization_config"].update(changes)
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(awq_checkpoint / "model.safetensors.index.json", out)
    for shard in awq_checkpoint.glob("*.safetensors"):
        (out / shard.name).write_bytes(b"not safetensors")
    for aux in _AUX:
        shutil.copy(awq_checkpoint / aux, out / aux)
    return out


REFUSED = [
    ("bits", 8, "bits is 8"),
    ("bits", 3, "bits is 3"),
    ("group_size", 100, "group_size is 100"),
    ("group_size", -1, "group_size is -1"),
    ("zero_point", False, "zero_point is False"),
    ("version", "gemv", "version is 'gemv'"),
    ("version", "marlin", "version is 'marlin'"),
    ("quant_method", "gptq", "quant_method is 'gptq'"),
    ("quant_method", "bitsandbytes", "quant_method is 'bitsandbytes'"),
]


@pytest.mark.parametrize("field, value, said", REFUSED)
def test_unreadable_quantization_is_refused_before_reading_weights(awq_checkpoint: Path, tmp_path: Path, field: str,
                                                                   value: object, said: str) -> None:
    bad = _config_only(awq_checkpoint, tmp_path / "bad", **{field: value})
    for attempt in (lambda: open_checkpoint(bad), lambda: load_model(bad),
                    lambda: export_bundle(bad, tmp_path / "out", progress=False)):
        with pytest.raises(QuantizationError) as error:
            attempt()
        message = str(error.value)
        assert f"quantization_config.{said}" in message and "\n" not in message and str(bad) in message
    assert not (tmp_path / "out").exists()
    cli = subprocess.run([sys.executable, "-P", "-m", "rexedge.runtime.cli", "export", str(bad), "--out",
                          str(tmp_path / "cli")], capture_output=True, text=True)
    assert cli.returncode == 2 and said in cli.stderr and len(cli.stderr.strip().splitlines()) == 1, cli.stderr


def test_awq_export_refuses_requantizing(awq_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="AWQ 4-bit checkpoint.*weights 'int8' would re-quantize"):
        export_bundle(awq_checkpoint, tmp_path / "a", weights="int8", progress=False)
    with pytest.raises(ExportError, match="group_size 128 and zero points.*block_size"):
        export_bundle(awq_checkpoint, tmp_path / "b", progress=False, nbits_options={"block_size": 32})
    assert not any(tmp_path.iterdir())


def test_packed_layers_need_a_quantization_config(awq_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(awq_checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    del config["quantization_config"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.\d+\..*\.qweight' in .* is a quantized layer, but "
                                              r".*config\.json has no quantization_config"):
        open_checkpoint(bad)
