"""Checkpoint loading (rexedge.runtime.model.checkpoint) against transformers' Qwen2.5-VL and raw safetensors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from rexedge.runtime.model import checkpoint
from rexedge.runtime.model.checkpoint import (
    CheckpointError, checkpoint_digest, expected_tensor_shapes, iter_checkpoint_tensors, load_model,
    open_checkpoint)
from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.model.compact import RexOmniModel
from rexedge.export.fixtures.tiny import write_tiny_checkpoint

TINY = RexOmniConfig.preset("tiny")


def hf_model(cfg: RexOmniConfig) -> Qwen2_5_VLForConditionalGeneration:
    """A transformers model with fresh random weights; biases and norms randomised too so that mix-ups show."""
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg.to_hf_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or p.dim() == 1:
                p.normal_()
    return model


def hf_published_state(model: Qwen2_5_VLForConditionalGeneration, tied: bool) -> dict[str, torch.Tensor]:
    """transformers' in-memory tensors under the names the published checkpoint uses."""
    renamed = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
               for k, v in model.state_dict().items()}
    if tied:
        del renamed["lm_head.weight"]
    return renamed


def stored_names(directory: Path) -> set[str]:
    names: set[str] = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names.update(f.keys())
    return names


def assert_model_equals(model: RexOmniModel, reference: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


# ----------------------------------------------------------------------------- names and shapes


@pytest.mark.parametrize("preset", ["tiny", "rex-omni-3b"])
@pytest.mark.parametrize("tied", [True, False])
def test_expected_shapes_match_transformers_and_our_model(preset: str, tied: bool) -> None:
    cfg = RexOmniConfig.preset(preset).replace(tie_word_embeddings=tied)
    with torch.device("meta"):
        reference = hf_published_state(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg.to_hf_dict())), tied)
        ours = RexOmniModel(cfg).state_dict()
    expected = expected_tensor_shapes(cfg)
    assert expected == {k: tuple(v.shape) for k, v in reference.items()}
    assert expected == {k: tuple(v.shape) for k, v in ours.items()}
    if preset == "rex-omni-3b":
        # Qwen2.5-VL-3B: about 3.75 billion parameters with the vision tower, head tied
        assert math.isclose(sum(math.prod(s) for s in expected.values()), 3.75e9 + (not tied) * 151936 * 2048,
                            rel_tol=0.01)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("tied", [True, False])
def test_load_save_pretrained_checkpoint(tmp_path: Path, tied: bool) -> None:
    """transformers' own save_pretrained: nested text_config, several shards, tied or untied head."""
    hf = hf_model(TINY.replace(tie_word_embeddings=tied))
    hf.save_pretrained(tmp_path, max_shard_size="150KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert ("lm_head.weight" in stored_names(tmp_path)) == (not tied)
    model = load_model(tmp_path)
    assert_model_equals(model, hf_published_state(hf, tied))


def test_load_transformers_in_memory_names_single_file(tmp_path: Path) -> None:
    """A single model.safetensors holding transformers' in-memory names (model.language_model.*, model.visual.*)."""
    cfg = TINY.replace(tie_word_embeddings=False)
    hf = hf_model(cfg)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    assert any(k.startswith("model.visual.") for k in state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert_model_equals(load_model(tmp_path), hf_published_state(hf, tied=False))


def test_load_published_tiny_checkpoint(tiny_checkpoint: Path) -> None:
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    from_files: dict[str, torch.Tensor] = {}
    for shard in set(index["weight_map"].values()):
        from_files.update(load_file(tiny_checkpoint / shard))
    assert_model_equals(load_model(tiny_checkpoint), from_files)


@pytest.mark.parametrize("on_disk", ["float16", "bfloat16"])
def test_half_precision_on_disk(tmp_path: Path, on_disk: str) -> None:
    directory = write_tiny_checkpoint(tmp_path / on_disk, seed=3, dtype=on_disk)
    stored = {}
    for shard in directory.glob("*.safetensors"):
        stored.update(load_file(shard))
    assert {t.dtype for t in stored.values()} == {getattr(torch, on_disk)}
    # dtype=None keeps the config's torch_dtype, which the writer sets to the stored one
    assert_model_equals(load_model(directory), stored)
    # an explicit dtype converts every tensor
    assert_model_equals(load_model(directory, dtype=torch.float32), {k: v.float() for k, v in stored.items()})
    other = torch.bfloat16 if on_disk == "float16" else torch.float16
    assert_model_equals(load_model(directory, dtype=other), {k: v.to(other) for k, v in stored.items()})


@pytest.fixture
def small_tied_check_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compare a stored tied head in several uneven row blocks, as the 3B checkpoint would be."""
    monkeypatch.setattr(checkpoint, "_TIED_CHECK_ROWS", 333)


@pytest.mark.usefixtures("small_tied_check_blocks")
def test_tied_checkpoint_with_equal_head_is_accepted(tmp_path: Path) -> None:
    hf = hf_model(TINY)
    state = {k: v.clone() for k, v in hf.state_dict().items()}  # tied: lm_head.weight == embedding
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    assert_model_equals(load_model(tmp_path), hf_published_state(hf, tied=True))
    names = [name for name, _, _ in iter_checkpoint_tensors(tmp_path)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


@pytest.mark.usefixtures("small_tied_check_blocks")
def test_tied_checkpoint_with_different_head_is_an_error(tmp_path: Path) -> None:
    hf = hf_model(TINY)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["lm_head.weight"][TINY.vocab_size - 1, 5] += 1.0  # differs in the last row block only
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight.*model\.safetensors.*tie_word_embeddings"):
        load_model(tmp_path)


def test_iter_checkpoint_tensors(tiny_checkpoint: Path) -> None:
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    seen = {}
    for name, tensor, file in iter_checkpoint_tensors(tiny_checkpoint, dtype=torch.float16):
        assert name not in seen
        assert file.name == index["weight_map"][name]
        with safe_open(file, "pt") as f:
            assert torch.equal(tensor, f.get_tensor(name).half())
        seen[name] = tuple(tensor.shape)
    assert seen == expected_tensor_shapes(TINY)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def single_file_checkpoint(tmp_path: Path) -> Path:
    """A tiny untied checkpoint in one model.safetensors with published names, for the error tests to edit."""
    cfg = TINY.replace(tie_word_embeddings=False)
    hf = hf_model(cfg)
    directory = tmp_path / "single"
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in hf_published_state(hf, tied=False).items()},
              directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return directory


def edit_tensors(directory: Path, edit) -> None:
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(single_file_checkpoint: Path) -> None:
    edit_tensors(single_file_checkpoint, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*") as e:
        load_model(single_file_checkpoint)
    assert "model.safetensors" in str(e.value)


def test_missing_untied_head(single_file_checkpoint: Path) -> None:
    edit_tensors(single_file_checkpoint, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight") as e:
        load_model(single_file_checkpoint)
    assert "model.safetensors" in str(e.value)


def test_unexpected_tensor(single_file_checkpoint: Path) -> None:
    edit_tensors(single_file_checkpoint, lambda s: s.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(3, 5)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.7\.mlp\.up_proj\.weight' in .*"
                                              r"model\.safetensors"):
        load_model(single_file_checkpoint)


def test_wrong_shape(single_file_checkpoint: Path) -> None:
    name = "visual.blocks.2.attn.qkv.weight"
    edit_tensors(single_file_checkpoint, lambda s: s.update({name: s[name][:-1].clone()}))
    v = TINY.vision_hidden_size
    with pytest.raises(CheckpointError, match=rf"{name}' in .*model\.safetensors has shape \[{3 * v - 1}, {v}\], "
                                              rf"expected \[{3 * v}, {v}\]"):
        load_model(single_file_checkpoint)


def test_unsupported_dtype(single_file_checkpoint: Path) -> None:
    name = "model.norm.weight"
    edit_tensors(single_file_checkpoint, lambda s: s.update({name: s[name].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"{name}' in .*model\.safetensors is stored as I32"):
        open_checkpoint(single_file_checkpoint)


def test_tensor_stored_under_both_names(single_file_checkpoint: Path) -> None:
    edit_tensors(single_file_checkpoint,
                 lambda s: s.update({"model.language_model.norm.weight": s["model.norm.weight"].clone()}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is stored twice"):
        open_checkpoint(single_file_checkpoint)


def copy_of(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "copy"))


def test_index_points_at_missing_shard(tiny_checkpoint: Path, tmp_path: Path) -> None:
    directory = copy_of(tiny_checkpoint, tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json points at shard '{shard.name}'"):
        load_model(directory)


def test_index_names_tensor_its_shard_lacks(tiny_checkpoint: Path, tmp_path: Path) -> None:
    directory = copy_of(tiny_checkpoint, tmp_path)
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"maps tensor '{name}' to {shards[1]}, which does not contain it"):
        open_checkpoint(directory)


def test_missing_directory_config_and_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_model(tmp_path / "nowhere")
    directory = copy_of(tiny_checkpoint, tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_model(directory)
    directory = Path(shutil.copytree(tiny_checkpoint, tmp_path / "no_weights"))
    for file in [*directory.glob("*.safetensors"), directory / "model.safetensors.index.json"]:
        file.unlink()
    (directory / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors\.index\.json and no model\.safetensors.*"
                                              r"pytorch_model\.bin"):
        load_model(directory)


def test_not_a_safetensors_file(single_file_checkpoint: Path) -> None:
    (single_file_checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(single_file_checkpoint)


# ----------------------------------------------------------------------------- digest


def test_digest(tiny_checkpoint: Path, tmp_path: Path) -> None:
    digest = checkpoint_digest(tiny_checkpoint)
    assert len(digest) == 64 and int(digest, 16) >= 0
    directory = copy_of(tiny_checkpoint, tmp_path)
    assert checkpoint_digest(directory) == digest  # the location does not matter
    (directory / "tokenizer_config.json").write_text("{}")  # not part of the weights' identity
    assert checkpoint_digest(directory) == digest

    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor's data
    shard.write_bytes(bytes(data))
    assert checkpoint_digest(directory) != digest

    directory = Path(shutil.copytree(tiny_checkpoint, tmp_path / "config_changed"))
    config = json.loads((directory / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (directory / "config.json").write_text(json.dumps(config))
    assert checkpoint_digest(directory) != digest
