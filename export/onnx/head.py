"""The full-vocabulary head of a weight-quantized bundle as an ONNX graph: hidden [B, H] -> logits [B, V].

At the real size the tied embedding is 151,936 x 2,048: as float32 (1.24 GB) a full-vocabulary
step (free text, exact mode) reads more bytes than an int4 decoder step. Weight-quantized
bundles therefore also carry the table as one MatMulNBits node, quantized as int8 (block 128,
asymmetric, accuracy_level 4) whatever the decoder's format, the choice llama.cpp's Q4_K_M
makes too (its output matrix stays at 6 bits): measured on the 3B table (bench/RESULTS.md,
2026-12-05), int8 gives logits with cosine >= 0.99996 to float and the same argmax on 8 of 8
random hidden states at ~12-30 ms a step; int4 reads half of that but only 0.995 and 6 of 8.

Only the full-vocabulary products run it. Coordinate and listed rows stay float (1,000 rows
of the memory-mapped table are 8 MB) and the input lookup reads the float rows it needs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from rexedge.export.onnx.graph import MS_DOMAIN, GraphBuilder
from rexedge.export.onnx.nbits import NBitsWeights
from rexedge.runtime import manifest as schema
from rexedge.runtime.config import RexOmniConfig

HEAD_FORMAT = "int8"
HEAD_WEIGHT = "head.weight"   # the tied embedding as [hidden, vocab] MatMulNBits initializers
BATCH = "batch"


def quantize_head(table: np.ndarray) -> tuple[NBitsWeights, dict[str, np.ndarray]]:
    """The embedding [vocab, hidden] quantized for the head graph: its settings and initializers by name."""
    nbits = NBitsWeights(HEAD_FORMAT)
    return nbits, nbits.quantize_rows(HEAD_WEIGHT, table)


def build_head_graph(cfg: RexOmniConfig, weights: dict[str, onnx.TensorProto], nbits: NBitsWeights) -> onnx.ModelProto:
    """logits [B, V] = hidden [B, H] @ embedding.T, over the initializers :func:`quantize_head` made."""
    g = GraphBuilder("rexedge_head", weights)
    g.input(schema.HIDDEN_STATES, TensorProto.FLOAT, [BATCH, cfg.hidden_size])
    g.output(nbits.matmul(g, schema.HIDDEN_STATES, HEAD_WEIGHT), schema.LOGITS, TensorProto.FLOAT,
             [BATCH, cfg.vocab_size])
    return g.build(f"Rex-Omni head ({nbits.weights} tied embedding, full vocabulary)", ((MS_DOMAIN, 1),))
