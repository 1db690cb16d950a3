"""Phrases constrained to the requested categories (opt-in structured decoding).

Rex-Omni writes each group's phrase as free text; usually a requested category, but it
may correct a typo or name something else (docs/model.md), so by default rexedge keeps the
phrase free. A caller who wants closed-vocabulary output (a robot that acts on "cup" and
nothing else) can constrain phrases to the categories' own token sequences: the decode
loop then chooses among the categories' next tokens (a handful of rows, not the
vocabulary) and appends a category's unique remainder in one step (jump-forward).

``PhraseTable`` maps each phrase prefix (token ids after <|object_ref_start|>) to the step
that follows it: ``(False, ids)``, choose one of ids; ``(True, ids)``, append ids. Every
path ends with <|object_ref_end|>.
"""

from __future__ import annotations

from collections.abc import Sequence

PhraseStep = tuple[bool, tuple[int, ...]]
PhraseTable = dict[tuple[int, ...], PhraseStep]


def phrase_table(phrases: Sequence[Sequence[int]], close_id: int) -> PhraseTable:
    """The table for phrases given as token ids (each without the closing id)."""
    sequences = {tuple(p) + (close_id,) for p in phrases if len(p) > 0}
    if not sequences:
        raise ValueError("phrase_table needs at least one non-empty phrase")
    children: dict[tuple[int, ...], set[int]] = {}
    for sequence in sequences:
        for i in range(len(sequence)):
            children.setdefault(sequence[:i], set()).add(sequence[i])
    table: PhraseTable = {}
    for prefix, options in children.items():
        if len(options) > 1:
            table[prefix] = (False, tuple(sorted(options)))
            continue
        # a single way on: follow it to the next branch or the end, and append it all at once
        run: list[int] = []
        cursor = prefix
        while len(children.get(cursor, ())) == 1:
            (token,) = children[cursor]
            run.append(token)
            cursor += (token,)
        table[prefix] = (True, tuple(run))
    return table
