"""The vision graph with int8 weights and activations (``rexedge export --vision-weights int8``).

The vision encoder is compute-bound on a CPU (matrix-matrix products over every patch), so what can
make it faster is int8 arithmetic, not fewer weight bytes. ONNX Runtime's dynamic quantization
(``quantize_dynamic``) rewrites the float32 graph's MatMul / Gemm layers: weights int8 per output
channel (symmetric), activations quantized per call (DynamicQuantizeLinear -> MatMulInteger); no
calibration images. Measured on the 3B encoder (448x448, 256 image tokens, 2-core Xeon with VNNI,
bench/RESULTS.md): 0.85 s per image against 4.32 s in float32 (5.1x), 0.67 GB of weights against
2.68 GB; image-embedding cosine 0.967-0.971 on random weights (a random 32-block encoder amplifies
every perturbation, as the int4 decoder's 0.59 there), so agreement on a trained checkpoint is what
decides whether it suits a task: it is an option, float32 stays the default.

Memory: ONNX Runtime's quantizer holds the whole float graph and its copies: 8.2 GB peak for the 3B
encoder (28 s), above the 2 GB the rest of the export needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from rexedge.runtime import manifest as schema

QUANTIZED_FILE = "vision.int8.onnx"   # its weights: vision.int8.onnx.data (ONNX Runtime names it after the graph)
OP_TYPES = ("MatMul", "Gemm")


def quantize_vision(source: Path, directory: Path) -> tuple[str, str, dict[str, Any]]:
    """Write ``directory/vision.int8.onnx`` (+ .data) from the float32 vision graph at ``source``;
    returns its file, its weights' file and the manifest's ``weights`` entry for it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = directory / QUANTIZED_FILE
    quantize_dynamic(source, out, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=list(OP_TYPES),
                     use_external_data_format=True)
    graph = onnx.load(out, load_external_data=False).graph
    quantized = sorted(n.name for n in graph.node if n.op_type == "MatMulInteger")
    if not quantized:
        raise ValueError(f"{source}: ONNX Runtime's dynamic quantization changed no MatMul of the vision graph")
    entry = schema.dynamic_int8_entry(op="MatMulInteger", quantized=quantized)
    return out.name, out.name + schema.DATA_SUFFIX, entry
