"""Tiny AutoAWQ checkpoints made by AutoAWQ's own packer, and AutoAWQ's own dequantization.

The reference is AutoAWQ (``pip install --no-deps autoawq accelerate``, see README's test
command): ``WQLinear_GEMM.from_linear`` packs a layer the way AutoAWQ writes the published
Rex-Omni-AWQ checkpoint, and ``awq.utils.packing_utils.dequantize_gemm`` is its dequantization.
The package's ``__init__`` imports its whole model zoo (``datasets``, transformers model
classes of its era), which neither installs nor imports here; its packer and dequantizer
need only torch and accelerate, so they are imported with the package's ``__init__`` files
skipped (:func:`awq_module`).

AutoAWQ packs integers it is given (``from_linear`` rounds (W + zero * scale) / scale and does
not clamp), so each weight is first put on a 4-bit grid per group of ``group_size`` input rows
(min-max, zero points in 0..15), as AutoAWQ's quantizer does before packing.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import sys
import types
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rexedge.export.fixtures.tiny import write_tiny_checkpoint
from rexedge.runtime.config import RexOmniConfig

GROUP_SIZE = 128
# the tiny preset widened so that every decoder linear layer's input is a multiple of 128 (the published
# group size): hidden 256 (2 groups), intermediate 512 (4 groups for down_proj)
CONFIG = RexOmniConfig.preset("tiny").replace(hidden_size=256, intermediate_size=512, mrope_section=(8, 12, 12),
                                              vision_out_hidden_size=256)
_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
_AUX_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json",
              "generation_config.json")


def awq_module(name: str) -> types.ModuleType:
    """Import ``awq.<...>`` with the ``__init__`` of every package above it skipped (module docstring)."""
    if "awq" in sys.modules:
        root = Path(sys.modules["awq"].__path__[0])
    else:
        spec = importlib.util.find_spec("awq")   # locates the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("AutoAWQ is not installed: pip install --no-deps autoawq accelerate (the tests' "
                              "reference)")
        root = Path(spec.submodule_search_locations[0])
    parts = name.split(".")
    for depth in range(1, len(parts)):
        package = ".".join(parts[:depth])
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(root.joinpath(*parts[1:depth]))]
            sys.modules[package] = module
    if "awq.utils" not in sys.modules:   # gemm imports awq.utils.* too
        module = types.ModuleType("awq.utils")
        module.__path__ = [str(root / "utils")]
        sys.modules["awq.utils"] = module
    return importlib.import_module(name)


def reference_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                         group_size: int = GROUP_SIZE) -> torch.Tensor:
    """AutoAWQ's dequantization of one layer: [in, out] in the scales' dtype."""
    return awq_module("awq.utils.packing_utils").dequantize_gemm(qweight, qzeros, scales, 4, group_size)


def _grid(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight [out, in] -> (weight on the 4-bit grid, scales [in/g, out] fp16 values, zeros [in/g, out])."""
    out, k = weight.shape
    groups = weight.reshape(out, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low).clamp(min=1e-5) / 15).half().float()
    zeros = (-low / scales).round().clamp(0, 15)
    q = (groups / scales[..., None]).round().add(zeros[..., None]).clamp(0, 15)
    on_grid = ((q - zeros[..., None]) * scales[..., None]).reshape(out, k)
    return on_grid, scales.T.contiguous(), zeros.T.contiguous()


def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def write_awq_checkpoint(out: Path, seed: int = 0, group_size: int = GROUP_SIZE,
                         quantization: dict | None = None) -> Path:
    """A tiny AWQ checkpoint at ``out``: every decoder linear layer packed by AutoAWQ's ``WQLinear_GEMM``.

    Published layout: config.json with ``quantization_config`` (``quantization`` overrides its fields),
    two shards and an index; the scales are all in the second shard, so each layer's tensors span two
    files. The vision tower stays float (``modules_to_not_convert``)."""
    gemm = awq_module("awq.modules.linear.gemm")
    floating = write_tiny_checkpoint(out.with_name(out.name + "-float"), preset=CONFIG, seed=seed)
    first, second = {}, {}
    for name, tensor in _read_all(floating).items():
        if not _LINEAR.fullmatch(name):
            first[name] = tensor
            continue
        on_grid, scales, zeros = _grid(tensor.float(), group_size)
        linear = torch.nn.Linear(on_grid.shape[1], on_grid.shape[0], bias=False)
        linear.weight.data = on_grid
        packed = gemm.WQLinear_GEMM.from_linear(linear, 4, group_size, scales=scales, zeros=zeros)
        layer = name.removesuffix(".weight")
        first[layer + ".qweight"], first[layer + ".qzeros"] = packed.qweight, packed.qzeros
        second[layer + ".scales"] = packed.scales
    out.mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    for file, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / file)
    index = {"metadata": {}, "weight_map": {k: file for file, tensors in shards.items() for k in tensors}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((floating / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                     "zero_point": True, "version": "gemm", "modules_to_not_convert": ["visual"],
                                     **(quantization or {})}
    (out / "config.json").write_text(json.dumps(config))
    for aux in _AUX_FILES:
        shutil.copy(floating / aux, out / aux)
    shutil.rmtree(floating)
    return out


def reference_weights(checkpoint: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of an AWQ checkpoint by the name of the float model's tensor it stands for: quantized
    layers dequantized by AutoAWQ ([out, in], ``dtype``: float32 from float32 scales, float16 as AutoAWQ
    computes it from its fp16 scales), the rest as stored."""
    stored = _read_all(checkpoint)
    weights = {}
    for name, tensor in stored.items():
        if name.endswith(".qweight"):
            layer = name.removesuffix(".qweight")
            scales = stored[layer + ".scales"].to(dtype)
            weights[layer + ".weight"] = reference_dequantize(tensor, stored[layer + ".qzeros"], scales).T
        elif not name.endswith((".qzeros", ".scales")):
            weights[name] = tensor
    return weights
