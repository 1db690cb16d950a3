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

``PhrasesLeft`` is one response's view of a table: each category is answered at most once
(a phrase, once closed, is no longer offered; once every one is answered the response ends).
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


class PhrasesLeft:
    """The table's phrases not yet answered in one response; the decode loop makes one per response."""

    def __init__(self, table: PhraseTable) -> None:
        self._table = table
        self._left = set(_phrases_of(table))
        self._steps: dict[tuple[int, ...], PhraseStep] = {}   # branch points filtered so far; valid until answered()

    def step(self, prefix: tuple[int, ...], default: PhraseStep) -> PhraseStep:
        """The table's step after ``prefix`` without the answered phrases (``default`` where the table has none).

        A branch left with one way on is forced: no head call for a choice that is no choice. A branch point is
        filtered once per answered set, not at every step that reaches it."""
        forced, ids = self._table.get(prefix, default)
        if forced:
            return forced, ids
        step = self._steps.get(prefix)
        if step is None:
            depth = len(prefix)
            live = tuple(i for i in ids
                         if any(len(p) > depth and p[depth] == i and p[:depth] == prefix for p in self._left))
            step = self._steps[prefix] = (len(live) == 1, live)
        return step

    def answered(self, phrase: tuple[int, ...]) -> None:
        """``phrase`` (its ids, the closing id included) was written: never offer it again."""
        self._left.discard(phrase)
        self._steps.clear()

    @property
    def exhausted(self) -> bool:
        return not self._left


def _phrases_of(table: PhraseTable) -> list[tuple[int, ...]]:
    """Every complete phrase of the table (closing id included): the leaves of its walks from ()."""
    found, pending = [], [()]
    while pending:
        prefix = pending.pop()
        step = table.get(prefix)
        if step is None:     # past the closing id: a complete phrase
            found.append(prefix)
            continue
        forced, ids = step
        pending.extend([prefix + ids] if forced else [prefix + (i,) for i in ids])
    return found
