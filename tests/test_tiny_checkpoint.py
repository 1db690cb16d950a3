"""Tiny checkpoints (rexedge.export.fixtures.tiny): the published layout, read back by transformers and safetensors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, GenerationConfig, Qwen2_5_VLForConditionalGeneration

from rexedge.runtime.config import RexOmniConfig
from rexedge.export.fixtures.tiny import write_tiny_checkpoint
from rexedge.runtime.errors import RexEdgeError

TINY = RexOmniConfig.preset("tiny")


def read_shards(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("model-*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def special_ids(directory: Path) -> dict[str, int]:
    added = json.loads((directory / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return {token["content"]: int(i) for i, token in added.items()}


def test_layout(tiny_checkpoint: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config == json.loads(json.dumps(TINY.to_hf_dict()))  # flat, as published
    assert "text_config" not in config

    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(p.name for p in tiny_checkpoint.glob("*.safetensors")) == shards
    total = 0
    for shard in shards:
        with safe_open(tiny_checkpoint / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == {n for n, s in index["weight_map"].items() if s == shard}
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape()) * 4
                assert f.get_slice(name).get_dtype() == "F32"
    assert index["metadata"]["total_size"] == total

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json",
                 "preprocessor_config.json"):
        assert (tiny_checkpoint / name).is_file(), name
    assert not (tiny_checkpoint / "tokenizer.json").exists()  # the published checkpoint has none


def test_transformers_loads_with_no_missing_or_unexpected_keys(tiny_checkpoint: Path) -> None:
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    stored = read_shards(tiny_checkpoint)
    loaded = model.state_dict()
    assert torch.equal(loaded["model.language_model.layers.1.self_attn.k_proj.bias"],
                       stored["model.layers.1.self_attn.k_proj.bias"])
    assert torch.equal(loaded["model.visual.merger.mlp.2.weight"], stored["visual.merger.mlp.2.weight"])
    assert torch.equal(loaded["lm_head.weight"], stored["model.embed_tokens.weight"])  # tied


def test_processor_and_generation_configs(tiny_checkpoint: Path) -> None:
    processor = AutoImageProcessor.from_pretrained(tiny_checkpoint)
    rng = np.random.default_rng()
    # docs/model.md: 1440x810 -> 1428x812 -> grid (1, 58, 102); tiny and huge images hit min / max pixels
    for (width, height), grid in [((1440, 810), (1, 58, 102)), ((30, 20), (1, 8, 10)), ((4000, 3000), (1, 86, 116))]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        out = processor(images=[image], return_tensors="pt")
        assert tuple(out["image_grid_thw"][0].tolist()) == grid
        assert out["pixel_values"].shape == (grid[1] * grid[2], 1176)
    config = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert (config["min_pixels"], config["max_pixels"]) == (12544, 2007040)
    assert config["image_processor_type"] == "Qwen2VLImageProcessor"

    ids = special_ids(tiny_checkpoint)
    generation = GenerationConfig.from_pretrained(tiny_checkpoint)
    assert generation.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert generation.pad_token_id == ids["<|endoftext|>"]
    assert generation.repetition_penalty == 1.05 and not generation.do_sample


def test_greedy_decoding_varies_and_sees_the_image(tiny_checkpoint: Path) -> None:
    """Random weights that loop on one token would make every decoding test trivial."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    ids = special_ids(tiny_checkpoint)
    tokenizer_size = 1 + max(ids.values())
    grid_h, grid_w = 4, 6  # one odd-sized image: 24 patches, 6 image tokens
    image_tokens = grid_h * grid_w // 4
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    text = torch.randint(0, 1000, (9,), generator=generator).tolist()  # ordinary, non-coordinate tokens
    prompt = ([ids["<|im_start|>"]] + text[:4] + [ids["<|vision_start|>"]] + [ids["<|image_pad|>"]] * image_tokens
              + [ids["<|vision_end|>"]] + text[4:] + [ids["<|im_end|>"], ids["<|im_start|>"]])
    input_ids = torch.tensor([prompt])
    image_mask = (input_ids == ids["<|image_pad|>"]).long()

    def greedy(pixels: torch.Tensor) -> list[int]:
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             mm_token_type_ids=image_mask, pixel_values=pixels,
                             image_grid_thw=torch.tensor([[1, grid_h, grid_w]]), max_new_tokens=24, do_sample=False,
                             repetition_penalty=1.0, eos_token_id=None, pad_token_id=ids["<|endoftext|>"])
        return out[0, len(prompt):].tolist()

    first = greedy(torch.randn(grid_h * grid_w, 1176, generator=generator))
    second = greedy(torch.randn(grid_h * grid_w, 1176, generator=generator))
    assert len(first) == 24
    assert len(set(first)) >= 8, first
    assert max(first + second) < tokenizer_size  # the padding rows of the embedding are zero
    assert first != second  # the image changes the answer


def test_deterministic_in_the_seed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    for file in tiny_checkpoint.iterdir():
        assert (again / file.name).read_bytes() == file.read_bytes(), file.name
    other = read_shards(write_tiny_checkpoint(tmp_path / "other", seed=1))
    same = read_shards(tiny_checkpoint)
    assert all(not torch.equal(other[n], same[n]) for n in same if n.endswith(("proj.weight", "qkv.weight")))


def test_weights_statistics(tiny_checkpoint: Path) -> None:
    """The scheme the module documents: small embeddings, zero padding rows, norms near 1, gain 1.5 projections."""
    tensors = read_shards(tiny_checkpoint)
    tokens = 1 + max(special_ids(tiny_checkpoint).values())
    embed = tensors["model.embed_tokens.weight"]
    assert torch.count_nonzero(embed[tokens:]) == 0
    assert 0.04 < embed[:tokens].std() < 0.06
    assert 0.85 < tensors["model.norm.weight"].mean() < 1.15
    weight = tensors["model.layers.0.mlp.down_proj.weight"]
    assert 0.8 < weight.std() * math.sqrt(weight.shape[1]) / 1.5 < 1.2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_the_fp32_draw_rounded(tiny_checkpoint: Path, tmp_path: Path, dtype: str) -> None:
    half_dir = write_tiny_checkpoint(tmp_path / dtype, seed=0, dtype=dtype)
    assert json.loads((half_dir / "config.json").read_text())["torch_dtype"] == dtype
    full, half = read_shards(tiny_checkpoint), read_shards(half_dir)
    assert set(full) == set(half)
    for name, tensor in full.items():
        assert torch.equal(half[name], tensor.to(getattr(torch, dtype))), name


def test_shard_size_cap(tmp_path: Path) -> None:
    cap = 37_000  # odd, smaller than the embedding (2048 x 64 x 4 bytes), larger than most layers
    directory = write_tiny_checkpoint(tmp_path / "capped", seed=2, shard_max_bytes=cap)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 5
    for shard in shards:
        with safe_open(shard, "pt") as f:
            sizes = [math.prod(f.get_slice(n).get_shape()) * 4 for n in f.keys()]
        assert sum(sizes) <= cap or len(sizes) == 1, shard.name
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(RexEdgeError, match="unknown preset 'small'"):
        write_tiny_checkpoint(tmp_path / "a", preset="small")
    with pytest.raises(RexEdgeError, match="dtype 'int8'"):
        write_tiny_checkpoint(tmp_path / "b", dtype="int8")
    with pytest.raises(RexEdgeError, match="shard_max_bytes 0"):
        write_tiny_checkpoint(tmp_path / "c", shard_max_bytes=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(RexEdgeError, match="exists and is not a directory"):
        write_tiny_checkpoint(tmp_path / "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(RexEdgeError, match=r"not empty and not a checkpoint directory \(holds notes\.txt\)"):
        write_tiny_checkpoint(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["config.json", "notes.txt"]


def test_cli(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "from_cli"
    done = subprocess.run([sys.executable, "-m", "rexedge.runtime.cli", "tiny-checkpoint", str(out), "--seed", "0"],
                          capture_output=True, text=True, check=True)
    assert str(out) in done.stdout
    for file in tiny_checkpoint.iterdir():
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name
    # writing again replaces the earlier checkpoint, stale shards included
    (out / "model-00007-of-00009.safetensors").write_bytes(b"stale")
    subprocess.run([sys.executable, "-m", "rexedge.runtime.cli", "tiny-checkpoint", str(out), "--seed", "1"],
                   capture_output=True, text=True, check=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_checkpoint.iterdir())
    first_shard = sorted(tiny_checkpoint.glob("model-*.safetensors"))[0].name
    assert (out / first_shard).read_bytes() != (tiny_checkpoint / first_shard).read_bytes()  # seed 1 now

    (out / "notes.txt").write_text("")
    refused = subprocess.run([sys.executable, "-m", "rexedge.runtime.cli", "tiny-checkpoint", str(out)],
                             capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"rexedge tiny-checkpoint: error: {out}: not empty and not a checkpoint "
                                      f"directory (holds notes.txt); choose an empty or new directory")


def test_random_padding_rows_are_the_zero_checkpoints_draw(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """padding_rows="random" keeps the padding rows of the draw (as a real, untrained-there checkpoint has);
    every other tensor and row is the default checkpoint's."""
    random_dir = write_tiny_checkpoint(tmp_path / "random", seed=0, padding_rows="random")
    zero, random = read_shards(tiny_checkpoint), read_shards(random_dir)
    tokens = 1 + max(special_ids(tiny_checkpoint).values())
    embed = random["model.embed_tokens.weight"]
    assert embed.shape[0] > tokens and 0.04 < embed[tokens:].std() < 0.06
    torch.testing.assert_close(embed[:tokens], zero["model.embed_tokens.weight"][:tokens], rtol=0, atol=0)
    assert all(torch.equal(zero[n], random[n]) for n in zero if n != "model.embed_tokens.weight")
    with pytest.raises(RexEdgeError, match="padding_rows 'none': expected one of zero, random"):
        write_tiny_checkpoint(tmp_path / "bad", padding_rows="none")
