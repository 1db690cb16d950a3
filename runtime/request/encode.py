"""One request's decoder inputs: the prompt's token ids and M-RoPE positions for an image and a task,
and the prompt's embeddings with the image's embeddings at its image tokens."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from rexedge.runtime.request.positions import rope_positions
from rexedge.runtime.request.preprocess import PreprocessedImage
from rexedge.runtime.request.prompts import DEFAULT_SYSTEM_PROMPT, TaskPrompt, build_task_prompt, encode_prompt
from rexedge.runtime.request.tokenizer import Tokenizer


class EncodedTask(NamedTuple):
    task_prompt: TaskPrompt
    prompt_ids: np.ndarray   # [T] int64
    positions: np.ndarray    # [3, T] int64
    rope_delta: int


def encode_request(tokenizer: Tokenizer, task_prompt: TaskPrompt, image: PreprocessedImage,
                   system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> tuple[np.ndarray, np.ndarray, int]:
    """The decoder's inputs for one image and prompt: token ids [T], M-RoPE positions [3, T], rope_delta."""
    ids = tokenizer.ids
    prompt_ids = np.asarray(encode_prompt(tokenizer, ids, task_prompt, image.num_image_tokens, system_prompt),
                            dtype=np.int64)
    positions, rope_delta = rope_positions(prompt_ids, ids.image_pad, ids.vision_start, image.merged_grid_hw)
    return prompt_ids, positions, rope_delta


def encode_task(tokenizer: Tokenizer, image: PreprocessedImage, task: str, categories: Any = None,
                keypoint_type: str | None = None, visual_prompt_boxes: Any = None,
                system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> EncodedTask:
    """A task on a preprocessed image -> its prompt and the decoder's inputs (what ``RexOmni.prepare``,
    calibration and the benchmarks build a request from)."""
    task_prompt = build_task_prompt(task, categories, keypoint_type, visual_prompt_boxes, image.image_size)
    return EncodedTask(task_prompt, *encode_request(tokenizer, task_prompt, image, system_prompt))


def embed_prompt(embed_table: np.ndarray, prompt_ids: np.ndarray, image_embeds: np.ndarray,
                 image_token_id: int) -> np.ndarray:
    """The prompt's input embeddings [T, H] float32 (a new array), the image's embeddings [N, H] in
    the rows of its N image tokens, in order."""
    embeds = np.asarray(embed_table[prompt_ids], dtype=np.float32)
    image_rows = np.flatnonzero(prompt_ids == image_token_id)
    if image_rows.shape[0] != image_embeds.shape[0]:
        raise ValueError(f"prompt has {image_rows.shape[0]} image tokens but the image gave {image_embeds.shape[0]} "
                         f"embeddings")
    embeds[image_rows] = image_embeds
    return embeds
