"""Parallel category decoding: one image, K categories, K branches that share the prefill.

Every branch's prompt is the one-category prompt of its category (``Detect cup. ...``). Up to and
including ``<|vision_end|>`` the K prompts are the same tokens at the same positions (system prompt,
``<|vision_start|>``, the image), so that prefix is prefilled once, into the first branch's slot, and
copied into the other branches' slots (``copy_slot``); each branch then appends the rest of its own
prompt and the K branches decode together as a batch (``DecodeLoop.run_batch``). Each branch decodes
exactly what its one-category prompt would alone; the answers merge, in category order, into one
answer of the task's grammar (groups joined by ", ").

This asks the model something else than the joint prompt (one category at a time instead of all at
once): measure its quality before relying on it (bench/RESULTS.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rexedge.runtime.decode.loop import DecodeLoop, Generation, SequenceInput
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.encode import embed_prompt
from rexedge.runtime.request.tokenizer import TokenIds


@dataclass(frozen=True, eq=False)
class Branch:
    """One category's request: its prompt ids [T], positions [3, T], rope_delta, grammar and phrase table."""

    prompt_ids: np.ndarray
    positions: np.ndarray
    rope_delta: int
    grammar: object
    phrases: object = None


def shared_prefix(branches: list[Branch], ids: TokenIds) -> int:
    """Tokens every branch's prompt shares, up to and including ``<|vision_end|>`` (same ids, same positions)."""
    first = branches[0]
    length = int(np.flatnonzero(first.prompt_ids == ids.vision_end)[0]) + 1
    for branch in branches[1:]:
        if not (np.array_equal(branch.prompt_ids[:length], first.prompt_ids[:length])
                and np.array_equal(branch.positions[:, :length], first.positions[:, :length])):
            raise RexEdgeError("parallel categories: the branch prompts do not share their image prefix")
    return length


def decode_branches(loop: DecodeLoop, branches: list[Branch], image_embeds: np.ndarray
                    ) -> tuple[list[Generation], float]:
    """Decode the K branches of one image (K <= the loop's max_batch, the loop idle): one Generation each, in
    branch order, and the seconds the prefills took (the shared prefix once, then each branch's own rest)."""
    backend, ids = loop.backend, loop.ids
    if len(branches) > loop.max_batch:
        raise RexEdgeError(f"parallel categories: {len(branches)} categories need max_batch >= {len(branches)} "
                           f"(one slot per category), the model has max_batch={loop.max_batch}")
    length = shared_prefix(branches, ids)
    first = branches[0]

    def start_of(index: int, branch: Branch) -> Callable[[], SequenceInput]:
        def start() -> SequenceInput:
            began = time.perf_counter()
            if index == 0:   # the shared prefix, once, then into every other branch's slot
                prefix = embed_prompt(backend.embed_table, first.prompt_ids[:length], image_embeds, ids.image_pad)
                backend.prefill(prefix, first.positions[:, :length], slot=0)
                for other in range(1, len(branches)):
                    backend.copy_slot(0, other)
            hidden = backend.step(branch.prompt_ids[length:], branch.positions[:, length:], slot=index)
            prefill_s[index] = time.perf_counter() - began
            return SequenceInput(branch.prompt_ids, image_embeds, branch.positions, branch.rope_delta, branch.grammar,
                                 branch.phrases, slot=index, hidden=hidden)
        return start

    prefill_s: dict[int, float] = {}
    generations: dict[int, Generation] = {}
    for index, outcome in loop.run_batch((i, start_of(i, b)) for i, b in enumerate(branches)):
        if isinstance(outcome, Exception):
            raise outcome
        generations[index] = outcome
    return [generations[i] for i in range(len(branches))], sum(prefill_s.values())


def merged_tokens(generations: list[Generation], ids: TokenIds) -> list[int]:
    """The branches' answers as one answer: their groups in branch order, joined by ", ", then <|im_end|>."""
    merged: list[int] = []
    for gen in generations:
        groups = [t for t in gen.token_ids if t not in (ids.im_end, ids.endoftext)]
        if groups:
            merged += ([ids.comma, ids.space] if merged else []) + groups
    return merged + [ids.im_end]
