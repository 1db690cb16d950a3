"""What every backend provides to the decode loop, and nothing more.

A backend encodes images, prefills a prompt and appends tokens; it owns its KV cache.
The decode loop is shared (``rexedge.runtime.decode.loop``). The head (logits of the rows the
grammar allows, the penalty and the choice of token) comes from ``make_head``: host
backends return the numpy head over ``embed_table`` (the tied embedding); a GPU backend
returns one that keeps logits on the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, TypeVar, runtime_checkable

import numpy as np

from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.errors import RexEdgeError

if TYPE_CHECKING:
    from rexedge.runtime.decode.head import Head, NumpyHead, Sampling
    from rexedge.runtime.request.preprocess import PreprocessedImage
    from rexedge.runtime.request.tokenizer import Tokenizer

T = TypeVar("T")
DEFAULT_MAX_CONTEXT = 4096
# The most tokens one decode step appends per sequence (the decode loop's jump-forward chunk). A batched
# step pads every row to its longest run, so a slot's KV buffer holds this many slots beyond max_context:
# a row near the end of its context still has room for the padding (written, never attended to).
MAX_STEP_TOKENS = 64

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
    pixels: tuple[int, int] | None  # the model's own (min_pixels, max_pixels), a bundle's; None: the official defaults

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


@runtime_checkable
class BatchBackend(Backend, Protocol):
    """A backend that steps up to ``max_batch`` sequences together, each in its own KV slot.

    ``prefill(embeds, positions, slot=s)`` resets slot ``s`` and prefills it (one sequence, batch 1);
    ``step_batch`` appends to slots ``0..B-1`` in one call. Slot 0 is also what ``prefill`` / ``step``
    without a slot use, so a batch backend decodes one sequence exactly as before. With ``max_batch`` > 1
    the hidden state ``prefill`` or ``step`` returns for a slot stays valid until that slot's next call
    (the batched loop keeps it while it fills the other slots)."""

    max_batch: int

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, slot: int = 0) -> np.ndarray: ...

    def step_batch(self, token_ids: np.ndarray, position_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Append row b's first ``counts[b]`` of [B, T] tokens (at [3, B, T] positions) to slot b, for the
        first B slots at once; the rest of a row is padding (a row with count 0 is all padding: a slot
        not stepping), written after the slot's cached tokens, never attended to and overwritten by its
        next append. Returns [B, H], row b the hidden state after its last real token (garbage for a
        row with count 0)."""
        ...

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray, slot: int = 0) -> np.ndarray:
        """``Backend.step`` into ``slot``."""
        ...

    def copy_slot(self, source: int, target: int) -> None:
        """Slot ``target`` gets a copy of ``source``'s cached tokens (branches that share a prefill)."""
        ...

    def slot_length(self, slot: int) -> int:
        """Tokens cached in ``slot``."""
        ...


def check_max_batch(backend_name: str, max_batch: object) -> int:
    """``max_batch`` as an int >= 1; otherwise a BackendError naming the backend."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise BackendError(f"{backend_name} backend: max_batch must be a positive integer, got {max_batch!r}")
    return max_batch


def check_batch_step(backend_name: str, token_ids: np.ndarray, position_ids: np.ndarray, counts: np.ndarray,
                     max_batch: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arguments of ``step_batch`` checked: tokens [B, T] (1 <= B <= max_batch, T <= MAX_STEP_TOKENS),
    positions [3, B, T], counts [B] in 0..T with at least one row stepping."""
    token_ids, position_ids, counts = np.asarray(token_ids), np.asarray(position_ids), np.asarray(counts)
    if (token_ids.ndim != 2 or not 1 <= token_ids.shape[0] <= max_batch
            or not 1 <= token_ids.shape[1] <= MAX_STEP_TOKENS):
        raise BackendError(f"{backend_name} backend: step_batch token_ids must be [B, T] with B in 1..{max_batch} "
                           f"and T in 1..{MAX_STEP_TOKENS}, got {token_ids.shape}")
    rows, tokens = token_ids.shape
    check_token_ids(backend_name, token_ids.reshape(-1), vocab_size)
    if position_ids.shape != (3, rows, tokens) or not np.issubdtype(position_ids.dtype, np.integer):
        raise BackendError(f"{backend_name} backend: step_batch position_ids must be an integer array of shape "
                           f"(3, {rows}, {tokens}), got {position_ids.dtype} {position_ids.shape}")
    if counts.shape != (rows,) or counts.min() < 0 or counts.max() > tokens or counts.max() == 0:
        raise BackendError(f"{backend_name} backend: step_batch counts must be {rows} values in 0..{tokens}, "
                           f"at least one above 0, got {counts.tolist()}")
    return token_ids, position_ids, counts


def allocate_slots(backend_name: str, allocate: Callable[[], T], max_batch: int, capacity: int,
                   bytes_per_token: int) -> T:
    """``allocate()`` (the KV buffers of ``max_batch`` slots of ``capacity`` tokens); running out of memory
    is a BackendError saying how much the buffers need and what to lower."""
    try:
        return allocate()
    except (MemoryError, RuntimeError) as e:   # numpy raises MemoryError, torch and onnxruntime RuntimeError
        need = max_batch * capacity * bytes_per_token / 2**30
        raise BackendError(f"{backend_name} backend: the KV cache of max_batch={max_batch} slots x {capacity} tokens "
                           f"needs {need:.1f} GiB, which could not be allocated ({e}); lower max_batch or "
                           f"max_context") from None


def check_slot(backend_name: str, slot: int, max_batch: int) -> None:
    if not 0 <= slot < max_batch:
        raise BackendError(f"{backend_name} backend: slot {slot} outside 0..{max_batch - 1} (max_batch={max_batch})")


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
