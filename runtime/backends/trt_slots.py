"""The KV cache of the ``trt`` backend's batched decoding: ``max_batch`` rows that share one cache length.

The trt-flavour decoder appends by Concat: ``past_*`` [B, KVH, P, D] in, ``present_*`` [B, KVH, P+T, D]
out, one P for every row (see :mod:`rexedge.export.onnx.decoder`). Sequences of a batch differ in
prompt and answer length, so a row holds its tokens with holes between them, and ``key_valid``
[B, P+T] tells the graph which keys each row attends to. This class keeps, on the host, P, which
slots of each row are real (``valid``) and how many (``lengths``), and does the device copies that
move rows around; the engine call itself is the backend's.

Layout: per layer and kind two device buffers (sides, ping-pong as for one sequence), each holding
``max_batch`` rows of ``capacity`` tokens, of which the first ``rows`` are in use, densely packed as
[rows, KVH, P, D] (so a row's stride changes with P). A decoder call reads the current side and
writes the spare one, then they swap. The copies:

- a new request (``insert``): its prefill ran as one sequence into the spare side's start
  ([1, KVH, L, D]) and is copied into its row of the current side at slots 0..L-1; the rest of the
  row is holes. A prompt longer than P first widens every row to stride L (``widen``: the other
  rows' new slots are holes).
- ``compact``: when the next call would pass ``capacity``, each row's real slots move to its start
  (one 2-D copy per run of consecutive real slots, per layer and kind) and P becomes the longest row.
  A step's padding and the rows not stepping leave holes, so this happens every few hundred steps
  at most (``capacity`` - the longest row, divided by the step widths), never for one sequence.
- ``copy_row``: a slot takes another's cache (branches that share a prefill).

Every copy goes from one side to the other, or between two rows of one side, so no copy overlaps.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from rexedge.runtime.backends.cuda_memory import CudaMemory, DeviceBuffer


class SlotCache:
    """KV rows of the trt decoder for ``max_batch`` sequences (module docstring)."""

    def __init__(self, memory: CudaMemory, layers: int, kv_heads: int, head_dim: int, kv_bytes: int,
                 max_batch: int, capacity: int) -> None:
        self.memory = memory
        self.kv_heads, self.capacity = kv_heads, capacity
        self.token_bytes = head_dim * kv_bytes   # one token of one KV head
        size = max_batch * kv_heads * capacity * self.token_bytes
        # sides[side][layer] = (keys, values)
        self.sides = [[(memory.alloc(size), memory.alloc(size)) for _ in range(layers)] for _ in range(2)]
        # Holes are masked out of the scores, but their values still enter probabilities @ values with weight
        # 0, and 0 * NaN is NaN: every slot must hold a finite number, so the buffers start zeroed (holes
        # then hold zeros or some earlier real key / value).
        zeros = np.zeros(size, np.uint8)
        for side in self.sides:
            for pair in side:
                for buffer in pair:
                    memory.to_device(buffer, zeros)
        memory.synchronize()
        self.side = 0
        self.past = 0    # P: the cache length every row shares
        self.rows = 0    # rows in use (the batch of the next decoder call, at least)
        # invariant: valid[:, past:] is all false
        self.valid = np.zeros((max_batch, capacity), bool)
        self.lengths = np.zeros(max_batch, np.int64)

    @property
    def current(self) -> list[tuple[DeviceBuffer, DeviceBuffer]]:
        return self.sides[self.side]

    @property
    def spare(self) -> list[tuple[DeviceBuffer, DeviceBuffer]]:
        return self.sides[1 - self.side]

    def _pairs(self) -> Iterator[tuple[DeviceBuffer, DeviceBuffer]]:
        """(current, spare) buffer of every layer and kind."""
        for current, spare in zip(self.current, self.spare):
            yield from zip(current, spare)

    def key_valid(self, rows: int, tokens: int, out: np.ndarray) -> np.ndarray:
        """``key_valid`` [rows, P + tokens] of a decoder call appending ``tokens`` to the first ``rows`` rows,
        written into ``out`` (flat bool, host): each row's real slots, and every new slot (a row's padding is
        seen by its own padding queries only, which the causal mask keeps after its real ones; a row whose
        slots are all holes still attends to something, so no softmax is empty)."""
        width = self.past + tokens
        mask = out[:rows * width].reshape(rows, width)
        mask[:, :self.past] = self.valid[:rows, :self.past]
        mask[:, self.past:] = True
        return mask

    def appended(self, tokens: int, counts: np.ndarray) -> None:
        """After a decoder call that wrote the spare side: the first ``counts[b]`` of the ``tokens`` new slots
        of row b are real, the rest holes."""
        rows = counts.shape[0]
        self.side = 1 - self.side
        new = np.arange(tokens) < counts[:, None]
        self.valid[:rows, self.past:self.past + tokens] = new
        self.lengths[:rows] += counts
        self.past += tokens

    def widen(self, past: int) -> None:
        """Every row in use to stride ``past`` (> P): the new slots are holes."""
        if self.rows:
            row = self.past * self.token_bytes
            for current, spare in self._pairs():
                self.memory.copy_2d(spare, 0, past * self.token_bytes, current, 0, row, row, self.rows * self.kv_heads)
            self.side = 1 - self.side
        self.past = past

    def insert(self, slot: int, length: int) -> None:
        """Row ``slot`` takes a prefill of ``length`` tokens the decoder wrote at the spare side's start
        ([1, KVH, length, D]); P must be at least ``length`` (``widen`` first)."""
        assert length <= self.past, "widen the rows before inserting a longer prompt"
        row, width = self.past * self.token_bytes, length * self.token_bytes
        for current, spare in self._pairs():
            self.memory.copy_2d(current, slot * self.kv_heads * row, row, spare, 0, width, width, self.kv_heads)
        self.valid[slot] = False
        self.valid[slot, :length] = True
        self.lengths[slot] = length
        self.rows = max(self.rows, slot + 1)

    def copy_row(self, source: int, target: int) -> None:
        """Row ``target`` gets ``source``'s slots (a row is one contiguous block of KVH * P tokens)."""
        block = self.kv_heads * self.past * self.token_bytes
        if block:
            for current, _ in self._pairs():
                self.memory.copy_2d(current, target * block, block, current, source * block, block, block, 1)
        self.valid[target] = self.valid[source]
        self.lengths[target] = self.lengths[source]
        self.rows = max(self.rows, target + 1)

    def compact(self) -> None:
        """Each row's real slots to its start, in order; P becomes the longest row."""
        past = int(self.lengths[:self.rows].max(initial=0))
        src_row, dst_row = self.past * self.token_bytes, past * self.token_bytes
        runs = []   # (row, first slot, slots, where it goes)
        for b in range(self.rows):
            real = np.flatnonzero(self.valid[b, :self.past])
            if real.size == 0:
                continue
            breaks = np.flatnonzero(np.diff(real) != 1) + 1
            starts = np.concatenate([[0], breaks])
            ends = np.concatenate([breaks, [real.size]])
            runs.extend((b, int(real[s]), int(e - s), int(s)) for s, e in zip(starts, ends))
        for current, spare in self._pairs():
            for b, first, count, to in runs:
                self.memory.copy_2d(spare, b * self.kv_heads * dst_row + to * self.token_bytes, dst_row,
                                    current, b * self.kv_heads * src_row + first * self.token_bytes, src_row,
                                    count * self.token_bytes, self.kv_heads)
        self.side = 1 - self.side
        self.valid[:] = False
        for b in range(self.rows):
            self.valid[b, :self.lengths[b]] = True
        self.past = past
