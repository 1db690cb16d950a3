"""AutoAWQ checkpoints ("GEMM" packing), such as the published IDEA-Research/Rex-Omni-AWQ.

config.json carries ``quantization_config`` (``quant_method: "awq"``, ``bits: 4``,
``group_size``, ``zero_point: true``, ``version: "gemm"``, optionally
``modules_to_not_convert``). Each quantized linear layer ``X`` stores, instead of
``X.weight`` [out, in]:

- ``X.qweight`` int32 [in, out/8]: eight 4-bit values per int32, value ``i`` (bits 4i..4i+3)
  belonging to output column ``8c + AWQ_ORDER[i]`` of the int32's column ``c``;
- ``X.qzeros`` int32 [in/group, out/8]: the zero points of each group, packed the same way;
- ``X.scales`` fp16 [in/group, out];

and weight[o, k] = (q[k, o] - zero[k // group, o]) * scale[k // group, o]. Biases stay float.

This module reads that format exactly or refuses it: :func:`awq_settings` checks every field
of ``quantization_config`` against what is implemented, from config.json alone, so an
unreadable checkpoint is a one-line error before any shard is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from rexedge.runtime.errors import RexEdgeError

QUANTIZATION_CONFIG = "quantization_config"
# suffixes of a quantized linear layer's tensors, in place of ".weight"
QWEIGHT, QZEROS, SCALES = ".qweight", ".qzeros", ".scales"
PARTS = (QWEIGHT, QZEROS, SCALES)

BITS = 4
PACK = 32 // BITS   # values per int32
# where AutoAWQ's GEMM packing puts value i of an int32: output column 8c + AWQ_ORDER[i]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# column 8c + j holds value _UNPACK[j] of the int32 (the inverse permutation)
_UNPACK = tuple(AWQ_ORDER.index(j) for j in range(PACK))
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)


class QuantizationError(RexEdgeError, ValueError):
    """A quantized checkpoint rexedge cannot read exactly."""


@dataclass(frozen=True)
class AwqSettings:
    """The ``quantization_config`` of an AWQ checkpoint, as read (and checked) from config.json."""

    group_size: int
    modules_to_not_convert: tuple[str, ...] = ()

    bits = BITS


def _field(config: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in config:
        raise QuantizationError(f"{where}: {QUANTIZATION_CONFIG}.{key} is missing; an AWQ checkpoint states it")
    return config[key]


def awq_settings(config: Mapping[str, Any] | None, where: str) -> AwqSettings | None:
    """The AWQ settings of a config.json's ``quantization_config`` (None when there is none).

    Every setting rexedge cannot read exactly is a :class:`QuantizationError` naming the field
    and its value: another ``quant_method`` (gptq, bitsandbytes, ...), ``bits`` other than 4,
    ``zero_point`` false, a ``version`` other than "gemm" (gemv, marlin, exllama pack differently)
    and a ``group_size`` that is not a power of two >= 16 (the block sizes of ONNX Runtime's
    MatMulNBits, which a bundle repacks the integers into). ``where`` names the file.
    """
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise QuantizationError(f"{where}: {QUANTIZATION_CONFIG} is {config!r}; expected an object")
    method = str(_field(config, "quant_method", where)).lower()
    if method != "awq":
        raise QuantizationError(f"{where}: {QUANTIZATION_CONFIG}.quant_method is {config['quant_method']!r}; "
                                f"rexedge reads only AutoAWQ checkpoints (quant_method 'awq')")
    bits = _field(config, "bits", where)
    if bits != BITS:
        raise QuantizationError(f"{where}: {QUANTIZATION_CONFIG}.bits is {bits!r}; rexedge reads 4-bit AWQ only")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantizationError(f"{where}: {QUANTIZATION_CONFIG}.version is {config['version']!r}; rexedge reads "
                                f"AWQ's 'gemm' packing only")
    zero_point = config.get("zero_point", True)
    if zero_point is not True:
        raise QuantizationError(f"{where}: {QUANTIZATION_CONFIG}.zero_point is {zero_point!r}; rexedge reads AWQ "
                                f"with zero points (zero_point true) only")
    group = _field(config, "group_size", where)
    if not (isinstance(group, int) and group >= 16 and group & (group - 1) == 0):
        raise QuantizationError(f"{where}: {QUANTIZATION_CONFIG}.group_size is {group!r}; rexedge reads group "
                                f"sizes that are powers of two >= 16 (ONNX Runtime MatMulNBits block sizes)")
    skipped = config.get("modules_to_not_convert") or ()
    if isinstance(skipped, str) or not all(isinstance(m, str) for m in skipped):
        raise QuantizationError(f"{where}: {QUANTIZATION_CONFIG}.modules_to_not_convert is {skipped!r}; expected "
                                f"a list of module names")
    return AwqSettings(group, tuple(skipped))


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] in AWQ's GEMM order -> uint8 [rows, cols] of values 0..15."""
    rows = packed.shape[0]
    values = (packed.to(torch.int32)[:, :, None] >> _SHIFTS) & (2 ** BITS - 1)   # [rows, cols/8, value i]
    return values[:, :, list(_UNPACK)].reshape(rows, -1).to(torch.uint8)


@dataclass(frozen=True)
class AwqWeight:
    """One quantized linear layer as stored: the integers, zero points and scales, not yet combined."""

    qweight: torch.Tensor   # int32 [in, out/8]
    qzeros: torch.Tensor    # int32 [in/group, out/8]
    scales: torch.Tensor    # [in/group, out], fp16 in AutoAWQ's files
    group_size: int

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q uint8 [in, out], zeros uint8 [in/group, out]): the 4-bit integers in natural column order."""
        return unpack_columns(self.qweight), unpack_columns(self.qzeros)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] (torch's layout) in ``dtype``.

        (q - zero) is an integer in -15..15 and a scale has 11 significant bits, so their
        product is exact in float32; it is rounded once, to ``dtype``, as AutoAWQ's own fp16
        dequantization rounds it."""
        q, zeros = self.unpack()
        centred = q.to(torch.float32) - self._per_row(zeros).to(torch.float32)
        return (centred * self._per_row(self.scales.to(torch.float32))).to(dtype).T.contiguous()

    def _per_row(self, per_group: torch.Tensor) -> torch.Tensor:
        """[in/group, out] -> [in, out]: each group's row repeated for its ``group_size`` input rows."""
        return per_group.repeat_interleave(self.group_size, dim=0)
