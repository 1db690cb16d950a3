"""The ``torch`` backend: the compact model (:mod:`rexedge.runtime.model.compact`) on the CPU, from a checkpoint.

It is the reference the exported graphs are checked against, and needs no export step.
Its KV cache is the model's own per-layer ``[1, kv_heads, max_context, head_dim]``
buffers, written in place. On CUDA, ``load_backend("torch", ..., device="cuda")`` gives
the Triton / CUDA-graph backend instead (``torch_cuda``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rexedge.runtime.backends.base import (
    DEFAULT_MAX_CONTEXT,
    TORCH_DTYPES,
    BackendError,
    HostHeadBackend,
    check_capacity,
    check_embeds,
    check_image,
    check_positions,
    check_token_ids,
)

try:
    import torch
except ImportError:  # the runtime core installs without torch
    torch = None

if TYPE_CHECKING:
    from rexedge.runtime.request.preprocess import PreprocessedImage

class TorchBackend(HostHeadBackend):
    """Runs a checkpoint directory with the compact torch model."""

    name = "torch"

    def __init__(self, model_path: str | Path, device: str = "cpu", max_context: int = DEFAULT_MAX_CONTEXT,
                 dtype: str = "float32") -> None:
        if torch is None:
            raise BackendError("the torch backend needs torch: pip install rexedge[export]")
        if device != "cpu":
            raise BackendError(f"torch CPU backend: device {device!r}; use device='cpu' (or 'cuda' through load_backend)")
        if dtype not in TORCH_DTYPES:
            raise BackendError(f"torch backend: dtype {dtype!r}, expected one of {sorted(TORCH_DTYPES)}")
        from rexedge.runtime.model.checkpoint import load_model
        from rexedge.runtime.model.compact import KVCache
        from rexedge.runtime.request.tokenizer import Tokenizer

        torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        self._model = load_model(model_path, dtype=torch_dtype)
        self.config = self._model.config
        if not 1 <= max_context <= self.config.max_position_embeddings:
            raise BackendError(f"torch backend: max_context must be in 1..{self.config.max_position_embeddings}, "
                               f"got {max_context}")
        self.tokenizer = Tokenizer.from_dir(model_path)
        # shares memory with the parameter when it is float32
        self.embed_table = self._model.head_weight.detach().float().numpy()
        self.max_context = max_context
        self._cache = KVCache.allocate(self.config, 1, max_context, dtype=torch_dtype)
        self._dtype = torch_dtype
        self._length = 0

    def encode_image(self, image: PreprocessedImage) -> np.ndarray:
        check_image(self.name, image, self.config)
        with torch.inference_mode():
            embeds = self._model.encode_image(torch.from_numpy(np.array(image.pixel_patches, np.float32)), image.layout)
        return embeds.float().numpy()

    def _run(self, embeds: torch.Tensor, positions: np.ndarray) -> np.ndarray:
        tokens = embeds.shape[1]
        check_capacity(self.name, self._length, tokens, self.max_context)
        start = self._length
        hidden = self._model.decode(embeds.to(self._dtype), torch.from_numpy(np.array(positions, np.int64))[:, None],
                                    self._cache, torch.arange(start, start + tokens), kv_length=start + tokens)
        self._length += tokens
        return hidden[0, -1].float().numpy()

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        embeds = check_embeds(self.name, inputs_embeds, self.config.hidden_size)
        positions = check_positions(self.name, position_ids, embeds.shape[0])
        self._length = 0
        with torch.inference_mode():
            return self._run(torch.from_numpy(np.array(embeds, np.float32))[None], positions)

    def step(self, token_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        token_ids = check_token_ids(self.name, token_ids, self.config.vocab_size)
        positions = check_positions(self.name, position_ids, token_ids.size)
        with torch.inference_mode():
            return self._run(self._model.embed(torch.from_numpy(np.array(token_ids, np.int64))[None]), positions)
