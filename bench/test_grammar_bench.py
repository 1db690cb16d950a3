"""Per-token cost of the output grammar: next() + advance() over a 200-box detection answer.

Run: python -m pytest bench/test_grammar_bench.py --benchmark-columns=median,iqr,rounds
Each benchmark stores its median cost per token (ns) in extra_info["median_ns_per_token"].
"""

from __future__ import annotations

import numpy as np
import pytest

from rexedge.runtime.decode.grammar import make_grammar
from rexedge.runtime.request.tokenizer import TokenIds

# The real model's ids (docs/model.md), so the stream has the real id magnitudes.
REAL_IDS = TokenIds(coord_start=150643, num_coords=1000, endoftext=151643, im_start=151644, im_end=151645,
                    object_ref_start=151646, object_ref_end=151647, box_start=151648, box_end=151649,
                    vision_start=151652, vision_end=151653, image_pad=151655, comma=11, space=220, none=(4064,))


def detection_stream(num_boxes: int = 200, boxes_per_phrase: int = 10, seed: int = 0) -> list[int]:
    """An answer like a crowded scene's: phrases of 1-3 tokens, 10 boxes each, one "None" group."""
    ids, rng = REAL_IDS, np.random.default_rng(seed)
    tokens: list[int] = []
    for g in range(num_boxes // boxes_per_phrase):
        tokens += [ids.comma, ids.space] if g else []
        tokens += [ids.object_ref_start, *map(int, rng.integers(300, 100000, size=rng.integers(1, 4))),
                   ids.object_ref_end, ids.box_start]
        for b in range(boxes_per_phrase):
            tokens += [ids.comma] if b else []
            tokens += [ids.coord_start + int(v) for v in rng.integers(0, 1000, size=4)]
        tokens.append(ids.box_end)
    tokens += [ids.comma, ids.space, ids.object_ref_start, 500, ids.object_ref_end, ids.box_start, *ids.none,
               ids.box_end, ids.im_end]
    return tokens


def decode(phrase_ids: list[int]) -> str:
    return " ".join(map(str, phrase_ids))


@pytest.mark.parametrize("impl", ["c", "python"])
def test_grammar_per_token(benchmark, impl: str) -> None:
    stream = detection_stream()
    grammar = make_grammar("detection", REAL_IDS, (1920, 1080), impl, decode=decode)
    next_, advance = grammar.next, grammar.advance

    def decode_answer() -> None:
        grammar.reset()
        for token in stream:
            next_()
            advance(token)

    benchmark(decode_answer)
    assert len(grammar.detections) == 200
    benchmark.extra_info["tokens"] = len(stream)
    benchmark.extra_info["median_ns_per_token"] = benchmark.stats.stats.median / len(stream) * 1e9
    print(f"\n{impl}: {benchmark.extra_info['median_ns_per_token']:.0f} ns per token (next + advance, {len(stream)} tokens)")


def test_c_core_alone_per_token(benchmark) -> None:
    """The C core without the Python wrapper: the floor the wrapper's overhead sits on."""
    stream = detection_stream()
    core = make_grammar("detection", REAL_IDS, (1920, 1080), "c", decode=decode)._core
    next_, advance = core.next, core.advance

    def decode_answer() -> None:
        core.reset()
        for token in stream:
            next_()
            advance(token)

    benchmark(decode_answer)
    benchmark.extra_info["median_ns_per_token"] = benchmark.stats.stats.median / len(stream) * 1e9
    print(f"\nC core alone: {benchmark.extra_info['median_ns_per_token']:.0f} ns per token")
