"""Read a Rex-Omni / Qwen2.5-VL checkpoint directory: config, safetensors shards, weights.

A checkpoint is ``config.json`` plus either sharded safetensors with
``model.safetensors.index.json`` (the published layout; the index wins when both are
present) or one ``model.safetensors``.

Tensor names are normalised to the published ones (``model.layers.*``,
``model.embed_tokens.*``, ``model.norm.*``, ``visual.*``, ``lm_head.*``), which are also the
parameter names of :class:`rexedge.runtime.model.compact.RexOmniModel`. Recent transformers keeps
the text decoder under ``model.language_model.*`` and the vision encoder under
``model.visual.*`` in memory; files written from such a state dict are accepted too.

With ``tie_word_embeddings`` true the head is the embedding matrix. An ``lm_head.weight``
stored anyway (older exporters did) is accepted only if it equals
``model.embed_tokens.weight`` bit for bit, and is then skipped: a different head would
be silently ignored by a tied model, so it is an error that points at the config flag.

A checkpoint quantized with AutoAWQ (``quantization_config`` in config.json, see
:mod:`rexedge.runtime.model.awq`) is read too: each quantized layer's ``qweight`` / ``qzeros`` /
``scales`` stand for its ``.weight``, which is dequantized as it is read, or handed over packed
(``awq_packed=True``, for the exporter, which repacks the integers without re-quantizing).

Memory: tensors are read one at a time with the ``pread`` backend of safetensors, straight
into memory the caller then owns. Unlike a memory map this does not keep the shard's
pages mapped into the process (they would count against its resident set next to the
loaded copy), so loading needs about one copy of the weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from rexedge.runtime.config import ConfigError, RexOmniConfig
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.model.awq import (
    PARTS,
    QUANTIZATION_CONFIG,
    QWEIGHT,
    QZEROS,
    AwqSettings,
    AwqWeight,
    awq_settings,
)

if TYPE_CHECKING:
    from rexedge.runtime.model.compact import RexOmniModel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# safetensors dtype codes the model can be stored in
STORED_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# and the packed integers of an AWQ layer
PACKED_DTYPES: dict[str, torch.dtype] = {"I32": torch.int32}

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"

# rows compared per read when checking a stored head against the embedding (bounded memory)
_TIED_CHECK_ROWS = 8192
_HASH_CHUNK = 1 << 22
_SHOWN_NAMES = 6


class CheckpointError(RexEdgeError, ValueError):
    """A checkpoint directory that cannot be loaded: missing, extra or mis-shaped tensors, missing files."""


def published_name(stored_name: str) -> str:
    """The published name of a tensor stored under ``stored_name`` (either naming scheme)."""
    if stored_name.startswith("model.language_model."):
        return "model." + stored_name[len("model.language_model."):]
    if stored_name.startswith("model.visual."):
        return stored_name[len("model."):]
    return stored_name


def expected_tensor_shapes(cfg: RexOmniConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint for ``cfg`` holds, by published name, in the published order of layers."""
    h, v = cfg.hidden_size, cfg.vision_hidden_size
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    merged = v * cfg.merge_unit
    shapes: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.q_proj.bias": (q_out,),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.k_proj.bias": (kv_out,),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.bias": (kv_out,),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        })
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes[HEAD] = (cfg.vocab_size, h)
    shapes["visual.patch_embed.proj.weight"] = (
        v, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    for i in range(cfg.vision_depth):
        p = f"visual.blocks.{i}."
        shapes.update({
            p + "norm1.weight": (v,),
            p + "norm2.weight": (v,),
            p + "attn.qkv.weight": (3 * v, v),
            p + "attn.qkv.bias": (3 * v,),
            p + "attn.proj.weight": (v, v),
            p + "attn.proj.bias": (v,),
            p + "mlp.gate_proj.weight": (cfg.vision_intermediate_size, v),
            p + "mlp.gate_proj.bias": (cfg.vision_intermediate_size,),
            p + "mlp.up_proj.weight": (cfg.vision_intermediate_size, v),
            p + "mlp.up_proj.bias": (cfg.vision_intermediate_size,),
            p + "mlp.down_proj.weight": (v, cfg.vision_intermediate_size),
            p + "mlp.down_proj.bias": (v,),
        })
    shapes.update({
        "visual.merger.ln_q.weight": (v,),
        "visual.merger.mlp.0.weight": (merged, merged),
        "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (cfg.vision_out_hidden_size, merged),
        "visual.merger.mlp.2.bias": (cfg.vision_out_hidden_size,),
    })
    return shapes


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives: its published name, the name in the file, the file, shape and dtype.

    An AWQ layer's weight is stored as three tensors (``awq``: qweight, qzeros, scales); it is then
    listed under the weight's published name with the weight's shape [out, in], the scales' dtype,
    and the qweight's file and stored name."""

    name: str
    stored_name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    awq: tuple[StoredTensor, StoredTensor, StoredTensor] | None = None


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN_NAMES])
    more = len(names) - _SHOWN_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _open_shard(file: Path) -> safe_open:
    try:
        return safe_open(file, framework="pt", device="cpu", backend="pread")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


@dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint directory: its config and where each tensor is (nothing loaded yet)."""

    directory: Path
    config: RexOmniConfig
    index_file: Path | None
    shard_files: tuple[Path, ...]
    tensors: Mapping[str, StoredTensor]
    awq: AwqSettings | None = None

    @property
    def weight_files_label(self) -> str:
        """How error messages name the weight files: the index, or the single file."""
        return str(self.index_file or self.shard_files[0])

    def check(self, expected: Mapping[str, Sequence[int]]) -> None:
        """Raise :class:`CheckpointError` unless the stored tensors are exactly ``expected`` (published names -> shapes)."""
        stored = dict(self.tensors)
        if self.config.tie_word_embeddings and HEAD not in expected and HEAD in stored:
            head = stored.pop(HEAD)
            embed = stored.get(EMBED)
            if embed is not None and head.shape != embed.shape:
                raise CheckpointError(
                    f"tensor {HEAD!r} in {head.file} has shape {_shape(head.shape)}, but config.json ties it to "
                    f"{EMBED!r} of shape {_shape(embed.shape)}")
        missing = [n for n in expected if n not in stored]
        if missing:
            raise CheckpointError(
                f"{len(missing)} tensor(s) missing from {self.weight_files_label}: {_names(missing)} "
                f"(needed by the model that {self.directory / CONFIG_FILE} describes)")
        extra = [t for n, t in stored.items() if n not in expected]
        if extra:
            first = extra[0]
            raise CheckpointError(
                f"unexpected tensor {first.stored_name!r} in {first.file}: not part of the model that "
                f"{self.directory / CONFIG_FILE} describes"
                + (f" ({len(extra)} unexpected in all: {_names([t.stored_name for t in extra])})" if len(extra) > 1
                   else ""))
        for name, shape in expected.items():
            t = stored[name]
            if t.shape != tuple(shape):
                raise CheckpointError(
                    f"tensor {t.stored_name!r} in {t.file} has shape {_shape(t.shape)}, expected {_shape(shape)} "
                    f"for the model that {self.directory / CONFIG_FILE} describes")

    def check_tied_head(self) -> None:
        """With tied embeddings, a stored ``lm_head.weight`` must equal the embedding (compared in row blocks)."""
        head = self.tensors.get(HEAD)
        embed = self.tensors.get(EMBED)
        if not self.config.tie_word_embeddings or head is None or embed is None:
            return
        with _open_shard(head.file) as hf, _open_shard(embed.file) as ef:
            head_rows, embed_rows = hf.get_slice(head.stored_name), ef.get_slice(embed.stored_name)
            for start in range(0, head.shape[0], _TIED_CHECK_ROWS):
                stop = min(start + _TIED_CHECK_ROWS, head.shape[0])  # safetensors slices do not clamp
                if not torch.equal(head_rows[start:stop].to(embed.dtype), embed_rows[start:stop]):
                    raise CheckpointError(
                        f"tensor {head.stored_name!r} in {head.file} differs from {embed.stored_name!r} in "
                        f"{embed.file}, but {self.directory / CONFIG_FILE} sets tie_word_embeddings: true, which "
                        f"would ignore it; set tie_word_embeddings to false to use the separate head")

    def iter_tensors(self, dtype: torch.dtype | None = None, awq_packed: bool = False,
                     ) -> Iterator[tuple[str, torch.Tensor | AwqWeight, Path]]:
        """Yield ``(published_name, tensor, file)`` one tensor at a time, shard by shard in storage order.

        ``dtype`` converts each tensor as it is read (None keeps the stored dtype). A tied
        duplicate head is checked against the embedding and not yielded. An AWQ layer's weight
        is yielded dequantized (in ``dtype``, else its scales' dtype), or with ``awq_packed`` as
        the :class:`~rexedge.runtime.model.awq.AwqWeight` it is stored as.
        """
        self.check_tied_head()
        skip_head = self.config.tie_word_embeddings
        by_file: dict[Path, dict[str, StoredTensor]] = {f: {} for f in self.shard_files}
        for t in self.tensors.values():
            if not (skip_head and t.name == HEAD):
                by_file[t.file][t.stored_name] = t
        for file, wanted in by_file.items():
            if not wanted:
                continue
            with _open_shard(file) as f:
                for stored_name in f.offset_keys():
                    t = wanted.get(stored_name)
                    if t is None:
                        continue
                    if t.awq is not None:
                        packed = self._read_awq(t.awq, f)
                        yield t.name, (packed if awq_packed else packed.dequantize(dtype or t.dtype)), file
                        continue
                    tensor = f.get_tensor(stored_name)
                    yield t.name, (tensor if dtype is None else tensor.to(dtype)), file

    def _read_awq(self, parts: tuple[StoredTensor, ...], opened: safe_open) -> AwqWeight:
        """The three tensors of an AWQ layer; ``opened`` is the qweight's shard (the others may lie elsewhere)."""
        tensors = []
        for part in parts:
            if part.file == parts[0].file:
                tensors.append(opened.get_tensor(part.stored_name))
            else:
                with _open_shard(part.file) as other:
                    tensors.append(other.get_tensor(part.stored_name))
        assert self.awq is not None
        return AwqWeight(*tensors, group_size=self.awq.group_size)

    def digest(self) -> str:
        """sha256 identifying this checkpoint: config.json, the index (if any) and every shard, streamed."""
        files = [self.directory / CONFIG_FILE] + ([self.index_file] if self.index_file else []) + list(self.shard_files)
        total = hashlib.sha256()
        for file in sorted(files, key=lambda p: p.name):
            content = hashlib.sha256()
            with open(file, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    content.update(chunk)
            total.update(f"{content.hexdigest()}  {file.name}\n".encode())
        return total.hexdigest()


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_file}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: has no weight_map (tensor name -> shard file)")
    return weight_map


def _scan_file(file: Path, stored_names: Sequence[str] | None, source: Path) -> list[StoredTensor]:
    """Headers of the named tensors (all when ``stored_names`` is None) in one safetensors file."""
    found = []
    with _open_shard(file) as f:
        present = set(f.keys())
        for stored_name in (f.keys() if stored_names is None else stored_names):
            if stored_name not in present:
                raise CheckpointError(f"{source} maps tensor {stored_name!r} to {file.name}, which does not contain it")
            view = f.get_slice(stored_name)
            code = view.get_dtype()
            dtypes = PACKED_DTYPES if stored_name.endswith((QWEIGHT, QZEROS)) else STORED_DTYPES
            if code not in dtypes:
                raise CheckpointError(
                    f"tensor {stored_name!r} in {file} is stored as {code}; expected one of {sorted(dtypes)}")
            found.append(StoredTensor(published_name(stored_name), stored_name, file, tuple(view.get_shape()),
                                      dtypes[code]))
    return found


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read config.json and the safetensors headers of a checkpoint directory (no weights are loaded)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (expected a Rex-Omni checkpoint directory)")
    try:
        config = RexOmniConfig.from_json(directory / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    # before any shard is opened: a quantization rexedge cannot read exactly is refused here
    awq = awq_settings(config.extra.get(QUANTIZATION_CONFIG), str(directory / CONFIG_FILE))

    index_file: Path | None = directory / INDEX_FILE
    scanned: list[StoredTensor] = []
    if index_file.is_file():
        by_shard: dict[str, list[str]] = {}
        for stored_name, shard in _read_index(index_file).items():
            by_shard.setdefault(shard, []).append(stored_name)
        for shard in by_shard:
            if not (directory / shard).is_file():
                raise CheckpointError(
                    f"{index_file} points at shard {shard!r} (for {by_shard[shard][0]!r}), which does not exist")
        shard_files = tuple(directory / s for s in sorted(by_shard))
        for file in shard_files:
            scanned += _scan_file(file, by_shard[file.name], index_file)
    elif (directory / SINGLE_FILE).is_file():
        index_file = None
        shard_files = (directory / SINGLE_FILE,)
        scanned = _scan_file(shard_files[0], None, shard_files[0])
    else:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        hint = f" (found {', '.join(others)}: convert to safetensors)" if others else ""
        raise CheckpointError(f"{directory}: no {INDEX_FILE} and no {SINGLE_FILE}{hint}")

    tensors: dict[str, StoredTensor] = {}
    for t in scanned:
        seen = tensors.get(t.name)
        if seen is not None:
            raise CheckpointError(
                f"tensor {t.name!r} is stored twice: as {seen.stored_name!r} in {seen.file.name} and as "
                f"{t.stored_name!r} in {t.file.name}")
        tensors[t.name] = t
    return Checkpoint(directory, config, index_file, shard_files, _group_awq(tensors, awq, directory), awq)


def _group_awq(tensors: dict[str, StoredTensor], awq: AwqSettings | None, directory: Path) -> dict[str, StoredTensor]:
    """Replace each AWQ layer's qweight / qzeros / scales by one entry for its weight (see :class:`StoredTensor`)."""
    layers = [name[:-len(QWEIGHT)] for name in tensors if name.endswith(QWEIGHT)]
    if awq is None:
        if layers:
            t = tensors[layers[0] + QWEIGHT]
            raise CheckpointError(f"tensor {t.stored_name!r} in {t.file} is a quantized layer, but "
                                  f"{directory / CONFIG_FILE} has no {QUANTIZATION_CONFIG}")
        return tensors
    grouped = dict(tensors)
    for layer in layers:
        missing = [layer + p for p in PARTS if layer + p not in tensors]
        if missing:
            raise CheckpointError(f"AWQ layer {layer!r} lacks tensor(s) {_names(missing)} in {directory}")
        skipped = [m for m in awq.modules_to_not_convert if m in layer]
        if skipped:
            raise CheckpointError(f"AWQ layer {layer!r} is quantized, but {directory / CONFIG_FILE} lists "
                                  f"{skipped[0]!r} in {QUANTIZATION_CONFIG}.modules_to_not_convert")
        qweight, qzeros, scales = (grouped.pop(layer + p) for p in PARTS)
        rows, cols = qweight.shape[0], scales.shape[-1] if scales.shape else 0
        groups, pack = -(-rows // awq.group_size), 32 // awq.bits
        for part, shape in ((qweight, (rows, cols // pack)), (qzeros, (groups, cols // pack)), (scales, (groups, cols))):
            if part.shape != shape or rows % awq.group_size or cols % pack:
                raise CheckpointError(
                    f"tensor {part.stored_name!r} in {part.file} has shape {_shape(part.shape)}; AWQ layer {layer!r} "
                    f"with scales {_shape(scales.shape)} and group_size {awq.group_size} needs qweight "
                    f"[in, out/{pack}], qzeros [in/{awq.group_size}, out/{pack}], scales [in/{awq.group_size}, out] "
                    f"with in a multiple of {awq.group_size} and out of {pack}")
        if scales.dtype not in STORED_DTYPES.values():
            raise CheckpointError(f"tensor {scales.stored_name!r} in {scales.file} is {scales.dtype}; AWQ scales "
                                  f"are float")
        name = layer + ".weight"
        grouped[name] = StoredTensor(name, qweight.stored_name, qweight.file, (cols, rows), scales.dtype,
                                     (qweight, qzeros, scales))
    return grouped


def iter_checkpoint_tensors(path: str | Path, dtype: torch.dtype | None = None, awq_packed: bool = False,
                            ) -> Iterator[tuple[str, torch.Tensor | AwqWeight, Path]]:
    """Check a checkpoint against its config, then yield ``(published_name, tensor, file)`` one at a time
    (``awq_packed``: see :meth:`Checkpoint.iter_tensors`)."""
    checkpoint = open_checkpoint(path)
    checkpoint.check(expected_tensor_shapes(checkpoint.config))
    yield from checkpoint.iter_tensors(dtype, awq_packed)


def checkpoint_digest(path: str | Path) -> str:
    """sha256 over config.json, the index and the shard files of a checkpoint (for bundle manifests)."""
    return open_checkpoint(path).digest()


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(getattr(owner, leaf), torch.nn.Parameter):
        owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        owner.register_buffer(leaf, tensor)


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               ) -> RexOmniModel:
    """Build :class:`RexOmniModel` from a checkpoint directory, one tensor at a time.

    The model is created on the meta device and each stored tensor becomes its parameter
    (converted to ``dtype``; None means the config's ``torch_dtype``), so peak memory is
    about one copy of the weights plus one tensor.
    """
    from rexedge.runtime.model.compact import RexOmniModel

    checkpoint = open_checkpoint(path)
    target = dtype or TORCH_DTYPES[checkpoint.config.torch_dtype]
    with torch.device("meta"):
        model = RexOmniModel(checkpoint.config)
    checkpoint.check({name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()})
    for name, tensor, _ in checkpoint.iter_tensors(target):
        _assign(model, name, tensor.to(device))
    unset = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:
        # a table derived from the config must be built at forward time, not in __init__ on the meta device
        raise RuntimeError(f"RexOmniModel left {_names(unset)} unset after loading {checkpoint.directory}")
    return model.eval()
