"""Random checkpoints in exactly the published Rex-Omni layout, for tests and benchmarks.

``write_tiny_checkpoint`` writes what the published checkpoint directory holds: a flat
``config.json``, sharded safetensors with published tensor names and
``model.safetensors.index.json``, ``preprocessor_config.json``, ``generation_config.json``
and the tokenizer files (vocab.json + merges.txt + tokenizer_config.json, from
:mod:`rexedge.export.tiny_tokenizer`). Weights are random but deterministic in the seed.

Initialisation is chosen so that greedy decoding wanders instead of repeating one token:
with the usual small-std init the residual stream of a random model is dominated by the
current token's embedding and the argmax becomes a fixed point. Here embeddings are
small and the projections have more than unit gain (std 1.5/sqrt(fan_in)), so attention
and MLP outputs, which depend on the whole context, decide the next token. Embedding rows
that no token of the tokenizer uses (the padding rows) are zero by default, so greedy
decoding of the tests' checkpoints stays on ids with text; ``padding_rows="random"`` draws
them like the others, as in a real checkpoint (whose padding rows were initialised and
never trained), so that a model may choose them (the runtime must survive that).

The synthetic tokenizer takes the layout the preset's config ids imply (its
<|image_pad|> id is the 13th special): the "tiny" layout (coordinates 1000..1999,
specials from 2000) for "tiny", the real layout (coordinates 150643..151642, specials
from 151643) for the presets of the real vocabulary ("rex-omni-3b", "cpu-bench"), so
those checkpoints can be prompted with the real token ids.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors.torch import save_file

from rexedge.export.checkpoint import (
    EMBED, HEAD, INDEX_FILE, TORCH_DTYPES, expected_tensor_shapes)
from rexedge.export.config import RexOmniConfig
from rexedge.export.tiny_tokenizer import QWEN_SPECIAL_TOKENS, write_tiny_tokenizer
from rexedge.runtime.errors import RexEdgeError

# the published Rex-Omni image processor limits: 16 and 2560 merged tokens of 28x28 px
MIN_PIXELS = 16 * 28 * 28
MAX_PIXELS = 2560 * 28 * 28
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

EMBED_STD = 0.05
# 1.5 rather than 1: in a sweep over seeds and prompts it took greedy runs of 32 tokens from
# ~17 distinct tokens (with repeats of one token) to ~29
LINEAR_GAIN = 1.5
NORM_JITTER = 0.1
BIAS_STD = 0.1
# shards of the published 3B checkpoint are about this size; tiny ones get split in two
PUBLISHED_SHARD_BYTES = 4 * 2**30


def tiny_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """One randomly initialised fp32 tensor (see the module docstring for the scheme)."""
    noise = torch.randn(shape, generator=generator)
    if name in (EMBED, HEAD):
        return noise.mul_(EMBED_STD)
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
        return noise.mul_(NORM_JITTER).add_(1.0)
    if name.endswith(".bias"):
        return noise.mul_(BIAS_STD)
    return noise.mul_(LINEAR_GAIN / math.sqrt(math.prod(shape[1:])))


def tiny_tensors(cfg: RexOmniConfig, seed: int, dtype: torch.dtype, token_rows: int | None,
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint for ``cfg`` (published names and order), drawn from ``seed``.

    Embedding (and untied head) rows from ``token_rows`` on are zero: no token maps to them
    (None: every row stays random).
    """
    generator = torch.Generator().manual_seed(seed)
    for name, shape in expected_tensor_shapes(cfg).items():
        tensor = tiny_tensor(name, shape, generator)
        if name in (EMBED, HEAD) and token_rows is not None:
            tensor[token_rows:] = 0.0
        yield name, tensor.to(dtype)


def tokenizer_size(out: Path) -> int:
    """Number of ids the tokenizer files in ``out`` use (vocab.json and added tokens)."""
    vocab = json.loads((out / "vocab.json").read_text())
    added = json.loads((out / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
    return 1 + max([*vocab.values(), *(int(i) for i in added)])


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def preprocessor_config() -> dict:
    """The image processor config of the published checkpoint (Qwen2-VL processor, Rex-Omni pixel limits)."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def _special_id(tokenizer_config: dict, content: str) -> int:
    for token_id, token in tokenizer_config["added_tokens_decoder"].items():
        if token["content"] == content:
            return int(token_id)
    raise RexEdgeError(f"tokenizer_config.json written by write_tiny_tokenizer has no {content!r}")


def generation_config(tokenizer_config: dict) -> dict:
    """The reference's generation settings, with ids read from the tokenizer files."""
    endoftext = _special_id(tokenizer_config, "<|endoftext|>")
    return {
        "bos_token_id": endoftext,
        "pad_token_id": endoftext,
        "eos_token_id": [_special_id(tokenizer_config, "<|im_end|>"), endoftext],
        "do_sample": False,
        "repetition_penalty": 1.05,
    }


def _write_shards(out: Path, tensors: Iterator[tuple[str, torch.Tensor]], total_bytes: int,
                  shard_max_bytes: int) -> None:
    """Greedy sharding in tensor order; files are renamed once the shard count is known."""
    weight_map: dict[str, str] = {}
    written: list[Path] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        path = out / f"model-{len(written) + 1:05d}.partial"
        save_file(shard, path, metadata={"format": "pt"})
        written.append(path)
        weight_map.update({name: path.name for name in shard})
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > shard_max_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += size
    flush()

    final = {p.name: f"model-{i:05d}-of-{len(written):05d}.safetensors" for i, p in enumerate(written, 1)}
    for path in written:
        path.rename(out / final[path.name])
    _write_json(out / INDEX_FILE, {
        "metadata": {"total_size": total_bytes},
        "weight_map": {name: final[part] for name, part in sorted(weight_map.items())},
    })


CHECKPOINT_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "vocab.json", "merges.txt",
                    "tokenizer_config.json", INDEX_FILE)
# finished shards, and those of a run that stopped before renaming them
SHARD_PATTERNS = ("model-*-of-*.safetensors", "model-*.partial")


def _clear_previous_checkpoint(out: Path) -> None:
    """Let ``out`` be rewritten if it holds nothing but an earlier checkpoint; refuse to touch anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RexEdgeError(f"{out}: exists and is not a directory")
    entries = list(out.iterdir())
    foreign = [p.name for p in entries
               if not p.is_file() or not (p.name in CHECKPOINT_FILES or any(fnmatch(p.name, pattern) for pattern in SHARD_PATTERNS))]
    if foreign:
        raise RexEdgeError(f"{out}: not empty and not a checkpoint directory (holds {', '.join(sorted(foreign)[:5])}); "
                           f"choose an empty or new directory")
    for path in entries:
        path.unlink()


PADDING_ROWS = ("zero", "random")


def write_tiny_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "float32",
                          shard_max_bytes: int | None = None, padding_rows: str = "zero") -> Path:
    """Write a random checkpoint for ``preset`` in the published layout to ``out`` and return its path.

    ``dtype`` is the on-disk dtype ("float32", "float16" or "bfloat16"). ``shard_max_bytes``
    caps a shard's size; by default weights are split into at least two shards of at most
    4 GiB. ``out`` must be new, empty, or hold only an earlier checkpoint (which is replaced).
    ``padding_rows``: "zero" or "random", the embedding rows past the tokenizer's ids (module docstring).
    """
    if dtype not in TORCH_DTYPES:
        raise RexEdgeError(f"dtype {dtype!r}: expected one of {sorted(TORCH_DTYPES)}")
    if padding_rows not in PADDING_ROWS:
        raise RexEdgeError(f"padding_rows {padding_rows!r}: expected one of {', '.join(PADDING_ROWS)}")
    cfg = RexOmniConfig.preset(preset).replace(torch_dtype=dtype)
    out = Path(out)
    torch_dtype = TORCH_DTYPES[dtype]
    total_bytes = sum(math.prod(s) for s in expected_tensor_shapes(cfg).values()) * torch_dtype.itemsize
    if shard_max_bytes is None:
        shard_max_bytes = min(PUBLISHED_SHARD_BYTES, math.ceil(total_bytes / 2))
    if shard_max_bytes <= 0:
        raise RexEdgeError(f"shard_max_bytes {shard_max_bytes}: expected a positive number of bytes")

    _clear_previous_checkpoint(out)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out, num_ordinary=cfg.image_token_id - QWEN_SPECIAL_TOKENS.index("<|image_pad|>"))
    _write_json(out / "config.json", cfg.to_hf_dict())
    token_rows = tokenizer_size(out) if padding_rows == "zero" else None
    _write_shards(out, tiny_tensors(cfg, seed, torch_dtype, token_rows), total_bytes, shard_max_bytes)
    _write_json(out / "preprocessor_config.json", preprocessor_config())
    _write_json(out / "generation_config.json",
                generation_config(json.loads((out / "tokenizer_config.json").read_text())))
    return out
