"""The bundle's contract in names: its files, the manifest's keys, the graphs' input and output names.

``rexedge export`` writes these names, calibration and ``rexedge build`` add to them, the
runtime and the benchmarks read them: each is spelled here only. The layout and what each
entry holds are described in :mod:`rexedge.runtime.bundle`.
"""

from __future__ import annotations

from typing import Any, Mapping

FORMAT = "rexedge-bundle"
FORMAT_VERSION = 1

# files
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
HEAD_FILE = "embed_tokens.npy"
VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
HEAD_GRAPH_FILE = "head.onnx"   # weight-quantized bundles: the full-vocabulary head as MatMulNBits
DATA_SUFFIX = ".data"   # a graph's external weights beside it

# weight formats: what `rexedge export` writes, and what `rexedge calibrate` writes from an fp32
# bundle (Q/DQ graphs, float32 inputs, outputs and KV cache)
PRECISIONS = ("fp32", "fp16")
INT8 = "int8"
# weight-only quantized graphs (`rexedge export --weights`): the graph's linear weights as
# com.microsoft MatMulNBits, its activations in the bundle precision
WEIGHT_FORMATS = ("int4", "int8")

# top-level keys
FORMAT_KEY = "format"
VERSION_KEY = "format_version"
DIGEST_KEY = "manifest_sha256"
SOURCE = "source"            # {"checkpoint": name, "digest": ...}
CONFIG = "config"            # the published config.json layout
PRECISION = "precision"
FLAVOUR = "flavour"
TOKENS = "tokens"            # TokenIds as a dict
HEAD = "head"                # {"file", "dtype", "shape", "coord_rows"}
GRAPHS = "graphs"            # {VISION: graph entry, DECODER: graph entry}
FILES = "files"              # {file name: {"sha256", "bytes"}}
ENGINES = "engines"          # TensorRT engine records (rexedge build)
PREPACKED = "prepacked"      # ONNX Runtime prepacked-weight graph records per CPU target (rexedge prepack)
QUANTIZATION = "quantization"  # how an int8 bundle was calibrated
# optional {"min_pixels", "max_pixels"}: the image-size range the model was trained for, RexOmni's default
# for this bundle (`rexedge export --min-pixels --max-pixels`); absent: the official wrapper's defaults
PIXELS = "pixels"


def pixels_entry(min_pixels: Any, max_pixels: Any) -> dict[str, int]:
    """The manifest's ``PIXELS`` entry; ValueError unless 0 < min_pixels <= max_pixels, both integers."""
    if not (all(isinstance(p, int) and not isinstance(p, bool) for p in (min_pixels, max_pixels))
            and 0 < min_pixels <= max_pixels):
        raise ValueError(f"pixels ({min_pixels!r}, {max_pixels!r}): expected integers with 0 < min_pixels <= max_pixels")
    return {"min_pixels": min_pixels, "max_pixels": max_pixels}

VISION, DECODER = "vision", "decoder"   # the graphs

# a graph entry's keys
FILE, DATA, INPUTS, OUTPUTS, DIMS, PROFILES = "file", "data", "inputs", "outputs", "dims", "profiles"
WEIGHTS = "weights"   # present on a graph whose weights are quantized: weights_entry(); absent: the precision

# the decoder's batch dimension: its range in the graph entry's dims is how many sequences a bundle's
# decoder may step together (bundles exported before batched decoding record (1, 1))
BATCH_DIM = "batch"
MAX_BATCH = 64

# graph inputs and outputs
PIXEL_PATCHES = "pixel_patches"
IMAGE_EMBEDS = "image_embeds"
INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
SEQLENS_K = "seqlens_k"                          # ort flavour: total length - 1
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # ort flavour: the cache's capacity
KEY_VALID = "key_valid"                          # trt flavour: bool [batch, P + T], the keys each row attends to
HIDDEN_STATES = "hidden_states"
LOGITS = "logits"                                # the head graph's output [batch, vocab]
KV_KINDS = ("key", "value")


def past(kind: str, layer: int) -> str:
    """The decoder's cache input of one layer (``kind``: "key" or "value")."""
    return f"past_{kind}_{layer}"


def present(kind: str, layer: int) -> str:
    """The decoder's cache output of one layer."""
    return f"present_{kind}_{layer}"


HEAD_GRAPH = "graph"   # a head entry's quantized full-vocabulary graph: {FILE, DATA, WEIGHTS}


def head_entry(vocab_size: int, hidden_size: int, coord_rows: tuple[int, int],
               graph: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's ``head``: the tied embedding table, float32 [vocab, hidden], and its coordinate rows;
    with ``graph`` ({FILE, DATA, WEIGHTS: weights_entry()}) the full-vocabulary products run that graph instead
    of the float table (the coordinate and listed rows, and the input lookup, stay on the table)."""
    entry = {FILE: HEAD_FILE, "dtype": "float32", "shape": [vocab_size, hidden_size], "coord_rows": list(coord_rows)}
    if graph is not None:
        entry[HEAD_GRAPH] = dict(graph)
    return entry


def graph_entry(file: str, data: str | None, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                dims: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """One graph's entry: its file, external-data file, inputs/outputs ({name, dtype, shape}), dimension ranges."""
    return {FILE: file, DATA: data, INPUTS: inputs, OUTPUTS: outputs, DIMS: dict(dims)}


def dynamic_int8_entry(op: str, quantized: list[str]) -> dict[str, Any]:
    """A graph's ``weights`` after ONNX Runtime's dynamic quantization: int8 weights per output channel
    (symmetric), int8 activations quantized per call; ``quantized``: the nodes that compute in int8."""
    return {"format": "int8", "op": op, "bits": 8, "block_size": None, "symmetric": True, "accuracy_level": None,
            "activations": "int8, per call", "quantized": quantized, "origin": "onnxruntime"}


def weights_entry(fmt: str, op: str, bits: int, block_size: int, symmetric: bool, accuracy_level: int,
                  quantized: list[str], origin: str) -> dict[str, Any]:
    """A graph's ``weights``: format ("int4" / "int8"), the operator and its block settings, the quantized
    tensors, and ``origin``: who chose the integers ("onnxruntime": its quantizer at export; "awq": the
    checkpoint's AutoAWQ integers, repacked)."""
    return {"format": fmt, "op": op, "bits": bits, "block_size": block_size, "symmetric": symmetric,
            "accuracy_level": accuracy_level, "quantized": quantized, "origin": origin}
