"""What every backend provides to the decode loop, and nothing more.

A backend encodes images, prefills a prompt and appends tokens; it owns its KV cache.
The decode loop is shared (``rexedge.runtime.decode.loop``). The head (logits of the rows the
grammar allows, the penalty and the choice of token) comes from ``make_head``: host
backends return the numpy head over ``embed_table`` (the tied embedding); a GPU backend
returns one that keeps logits on the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.errors import RexEdgeError

if TYPE_CHECKING:
    from rexedge.runtime.decode.head import Head, NumpyHead, Sampling
    from rexedge.runtime.request.preprocess import PreprocessedImage
    from rexedge.runtime.request.tokenizer import Tokenizer

DEFAULT_MAX_CONTEXT = 4096

# dtype names the torch backends take -> torch dtype attribute names
TORCH_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


class BackendError(RexEdgeError, ValueError):
    """A backend that cannot be created or used as asked: unknown name or device, missing dependency, full cache."""


class HostHeadBackend:
    """What the host-side backends share: the numpy head over ``embed_table``, and the cache length
    they keep in ``_length``."""

    embed_table: np.ndarray
    _length: int

    @property
    def cache_length(self) -> int:
        return self._length

    def make_head(self, sampling: "Sampling") -> "NumpyHead":
        from rexedge.runtime.decode.head import NumpyHead

        return NumpyHead(self.embed_table, sampling)


@runtime_checkable
class Backend(Protocol):
    name: str
    config: RexOmniConfig
    tokenizer: "Tokenizer"
    embed_table: np.ndarray  # [vocab, H] float32: head rows and input lookup (may be a read-only memmap)
    max_context: int  # KV capacity in tokens

    def encode_image(self, image: "PreprocessedImage") -> np.ndarray:
        """Image embeddings [N/4, H] float32 in raster order of the merged grid."""
        ...

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Reset the cache, run [T, H] float32 embeddings at [3, T] int64 positions; last hidden [H] float32."""
        ...

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Append [k] int64 tokens at [3, k] positions after the cache; last hidden [H] float32."""
        ...

    @property
    def cache_length(self) -> int:
        """Tokens in the KV cache."""
        ...

    def make_head(self, sampling: "Sampling") -> "Head":
        """The head the decode loop chooses tokens with (one per loop; it keeps the seen-token record)."""
        ...


def check_capacity(backend_name: str, cache_length: int, new_tokens: int, max_context: int) -> None:
    if cache_length + new_tokens > max_context:
        raise BackendError(
            f"{backend_name} backend: {new_tokens} new token(s) after {cache_length} cached exceed the KV capacity "
            f"max_context={max_context}; create the backend with a larger max_context")


def check_positions(backend_name: str, position_ids: np.ndarray, tokens: int) -> np.ndarray:
    position_ids = np.asarray(position_ids)
    if position_ids.shape != (3, tokens) or not np.issubdtype(position_ids.dtype, np.integer):
        raise BackendError(f"{backend_name} backend: position_ids must be an integer array of shape (3, {tokens}), "
                           f"got {position_ids.dtype} {position_ids.shape}")
    return position_ids


def check_token_ids(backend_name: str, token_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 1 or token_ids.size == 0 or not np.issubdtype(token_ids.dtype, np.integer):
        raise BackendError(f"{backend_name} backend: token_ids must be a non-empty 1-D integer array, "
                           f"got {token_ids.dtype} {token_ids.shape}")
    if token_ids.min() < 0 or token_ids.max() >= vocab_size:
        raise BackendError(f"{backend_name} backend: token ids must be in 0..{vocab_size - 1}, got {token_ids.tolist()}")
    return token_ids


def check_embeds(backend_name: str, inputs_embeds: np.ndarray, hidden_size: int) -> np.ndarray:
    inputs_embeds = np.asarray(inputs_embeds)
    if inputs_embeds.ndim != 2 or inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] != hidden_size:
        raise BackendError(f"{backend_name} backend: inputs_embeds must have shape (T >= 1, {hidden_size}), "
                           f"got {inputs_embeds.shape}")
    return inputs_embeds


def check_image(backend_name: str, image: "PreprocessedImage", cfg: RexOmniConfig) -> None:
    patches = image.pixel_patches
    expected = (image.layout.num_patches, cfg.patch_dim)
    if patches.shape != expected:
        raise BackendError(f"{backend_name} backend: pixel_patches has shape {patches.shape}, the image's layout and "
                           f"the model need {expected}")
