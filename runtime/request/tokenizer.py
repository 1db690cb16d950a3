"""The Rex-Omni tokenizer on the ``tokenizers`` library (no transformers at run time).

Two on-disk forms load to the same ids:
- a checkpoint as published: ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``
  (no ``tokenizer.json``). Rex-Omni re-used the last 1,000 ordinary vocabulary entries as
  the coordinate tokens ``<0>``..``<999>``: vocab.json still holds the old byte strings at
  those ids, and ``added_tokens_decoder`` in tokenizer_config.json maps the ids to "<i>".
  The ids in ``added_tokens_decoder`` are authoritative.
- a single ``tokenizer.json`` (what ``Tokenizer.save`` writes and bundles ship).

Re-used ids: the old vocabulary strings at ids taken by added tokens are dropped, and so
are the merges that produce them (or start from them). Plain text therefore never encodes
to a coordinate or special id; the reference tokenizer, which keeps those merges, would
encode the (rare) old strings to coordinate ids. Tokens that only the dropped merges led
to stay in the vocabulary, unreachable.

User text is always plain text: ``encode_text`` runs a second tokenizer that has no added
tokens, so "<|im_end|>" or "<5>" typed by a user is cut into ordinary pieces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.manifest import TOKENIZER_FILE

# Qwen2's pre-tokenizer split: contractions, letter runs (with one leading non-letter),
# single digits, punctuation runs, newlines, and whitespace.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_COORDS = 1000

# TokenIds field -> the special token's text; the ids come from the tokenizer files.
SPECIAL_TOKENS: dict[str, str] = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "object_ref_start": "<|object_ref_start|>",
    "object_ref_end": "<|object_ref_end|>",
    "box_start": "<|box_start|>",
    "box_end": "<|box_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
}

VOCAB_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


class TokenizerError(RexEdgeError, ValueError):
    """Tokenizer files that are missing, malformed, or lack the tokens Rex-Omni needs."""


def coord_text(i: int) -> str:
    """The text of coordinate token ``i``: "<i>"."""
    return f"<{i}>"


def qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Qwen2's pre-tokenizer: the split regex, then byte-level symbols without a prefix space."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _configure_qwen2(backend: tokenizers.Tokenizer) -> None:
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = qwen2_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()


@dataclass(frozen=True)
class TokenIds:
    """The ids the prompt, the grammar and the decode loop need, read from the tokenizer."""

    coord_start: int
    num_coords: int
    endoftext: int
    im_start: int
    im_end: int
    object_ref_start: int
    object_ref_end: int
    box_start: int
    box_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    comma: int
    space: int
    none: tuple[int, ...]

    def is_coord(self, token_id: int) -> bool:
        return self.coord_start <= token_id < self.coord_start + self.num_coords

    def coord_token(self, i: int) -> int:
        """The id of coordinate token ``<i>``."""
        if not 0 <= i < self.num_coords:
            raise TokenizerError(f"coordinate bin {i} outside 0..{self.num_coords - 1}")
        return self.coord_start + i

    def coord_value(self, token_id: int) -> int:
        """The bin (0..num_coords-1) of a coordinate token id."""
        if not self.is_coord(token_id):
            raise TokenizerError(
                f"token id {token_id} is not a coordinate token "
                f"(expected {self.coord_start}..{self.coord_start + self.num_coords - 1})"
            )
        return token_id - self.coord_start


class Tokenizer:
    """Byte-level BPE with Rex-Omni's special and coordinate tokens.

    Build it with ``from_dir`` (a checkpoint or bundle directory) or ``from_file``
    (a tokenizer.json); the constructor takes a ready ``tokenizers.Tokenizer``.
    """

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self._full = backend
        # The same (shared) model, normalizer and pre-tokenizer with no added tokens: user
        # text can never match a special or coordinate token through it.
        self._plain = tokenizers.Tokenizer(backend.model)
        if backend.normalizer is not None:
            self._plain.normalizer = backend.normalizer
        if backend.pre_tokenizer is not None:
            self._plain.pre_tokenizer = backend.pre_tokenizer
        self._added = {token.content: token_id for token_id, token in backend.get_added_tokens_decoder().items()}
        known = np.fromiter(backend.get_vocab(with_added_tokens=True).values(), dtype=np.int64)
        self._vocab_size = int(known.max()) + 1
        # ids with text; the rest (none in a well-formed vocabulary) decode to nothing like padding rows
        self._has_text = np.zeros(self._vocab_size, dtype=bool)
        self._has_text[known] = True
        self.ids = self._read_token_ids()

    # loading ---------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load ``tokenizer.json`` if the directory has one, else vocab.json + merges.txt + tokenizer_config.json.

        When both forms are present, their added-token ids must agree: a tokenizer.json
        re-saved by a tool that renumbered the coordinate tokens is refused.
        """
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: not a directory (expected a checkpoint or bundle directory)")
        if (path / TOKENIZER_FILE).is_file():
            tokenizer = cls.from_file(path / TOKENIZER_FILE)
            config = path / "tokenizer_config.json"
            if config.is_file() and "added_tokens_decoder" in _read_json(config):
                tokenizer._check_agrees_with(_read_added_tokens(config), path)
            return tokenizer
        missing = [name for name in VOCAB_FILES if not (path / name).is_file()]
        if missing:
            raise TokenizerError(
                f"{path}: no tokenizer.json and missing {', '.join(missing)} "
                f"(expected tokenizer.json, or {', '.join(VOCAB_FILES)})"
            )
        return cls(
            _build_from_vocab(
                _read_vocab(path / "vocab.json"),
                _read_merges(path / "merges.txt"),
                _read_added_tokens(path / "tokenizer_config.json"),
                where=path,
            )
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load a single tokenizer.json."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such file (expected a tokenizer.json)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception subclasses with a message
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None
        try:
            return cls(backend)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write one tokenizer.json (into ``path`` if it is a directory); returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        self._full.save(str(path), pretty=False)
        return path

    # use -------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Ids of user text, always as plain text (never special or coordinate tokens)."""
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a str, got {type(text).__name__}")
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], rows: int | None = None) -> str:
        """Text of ``ids``; coordinate tokens decode to "<i>" and specials to their text.

        Ids without text decode to nothing, as the ``tokenizers`` library's own decode skips
        unknown ids: a model's embedding has padding rows past ``vocab_size`` (151,665..151,935
        in the real one) that its head can choose, and decoding what the model produced must
        never fail (``count_textless`` tells how many there were). ``rows``: the embedding's row
        count; an id outside 0..rows-1 cannot come from the model and is an error (negative
        ids always are).
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i < 0 or (rows is not None and i >= rows)]
        if bad:
            where = "negative" if rows is None else f"outside the embedding's rows 0..{rows - 1}"
            raise TokenizerError(f"cannot decode token ids {bad[:5]}: {where}")
        return self._full.decode([i for i in ids if self._text_of(i)], skip_special_tokens=False)

    def count_textless(self, ids: Iterable[int]) -> int:
        """How many of ``ids`` have no text (padding rows of the embedding): what ``decode`` drops."""
        return sum(not self._text_of(int(i)) for i in ids)

    def has_text(self, rows: int) -> np.ndarray:
        """[rows] bool: which ids of an embedding of ``rows`` rows have text (False: padding rows)."""
        mask = np.zeros(rows, dtype=bool)
        n = min(rows, self._vocab_size)
        mask[:n] = self._has_text[:n]
        return mask

    def _text_of(self, token_id: int) -> bool:
        return 0 <= token_id < self._vocab_size and bool(self._has_text[token_id])

    @property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer knows (the model's embedding may have padding rows past it)."""
        return self._vocab_size

    @property
    def added_tokens(self) -> Mapping[str, int]:
        """Text -> id of every added (special or coordinate) token."""
        return dict(self._added)

    # internals -------------------------------------------------------------
    def _read_token_ids(self) -> TokenIds:
        missing = [text for text in SPECIAL_TOKENS.values() if text not in self._added]
        if missing:
            raise TokenizerError(f"the tokenizer has no added token {', '.join(missing)} (a Qwen2.5-VL special token)")
        if coord_text(0) not in self._added:
            raise TokenizerError(
                f"the tokenizer has no coordinate tokens {coord_text(0)}..{coord_text(NUM_COORDS - 1)} "
                "among its added tokens (not a Rex-Omni tokenizer?)"
            )
        coord_start = self._added[coord_text(0)]
        for i in range(NUM_COORDS):
            found = self._added.get(coord_text(i))
            if found != coord_start + i:
                raise TokenizerError(
                    f"coordinate tokens are not contiguous: {coord_text(i)} has id {found}, "
                    f"expected {coord_start + i} ({coord_text(0)} is {coord_start})"
                )
        comma, space = self._single_token(","), self._single_token(" ")
        return TokenIds(
            coord_start=coord_start,
            num_coords=NUM_COORDS,
            comma=comma,
            space=space,
            none=tuple(self.encode_text("None")),
            **{field: self._added[text] for field, text in SPECIAL_TOKENS.items()},
        )

    def _single_token(self, text: str) -> int:
        ids = self.encode_text(text)
        if len(ids) != 1:
            raise TokenizerError(f"{text!r} must encode to one token, got {ids}")
        return ids[0]

    def _check_agrees_with(self, added: Mapping[int, dict[str, Any]], where: Path) -> None:
        for token_id, entry in sorted(added.items()):
            if self._added.get(entry["content"]) != token_id:
                raise TokenizerError(
                    f"{where}: tokenizer.json gives {entry['content']!r} id {self._added.get(entry['content'])}, "
                    f"tokenizer_config.json gives {token_id}; re-create tokenizer.json from the vocab files"
                )


# the published file layout ------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise TokenizerError(f"{path}: expected a JSON object of token -> integer id")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{path}:{number}: expected two space-separated tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_added_tokens(path: Path) -> dict[int, dict[str, Any]]:
    config = _read_json(path)
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    if not isinstance(decoder, dict) or not decoder:
        raise TokenizerError(f"{path}: no added_tokens_decoder (expected the special and coordinate tokens by id)")
    added = {}
    for key, entry in decoder.items():
        if not key.isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise TokenizerError(f"{path}: added_tokens_decoder entry {key!r} is not id -> {{'content': ...}}")
        added[int(key)] = entry
    return added


def _build_from_vocab(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    added: Mapping[int, dict[str, Any]],
    where: Path,
) -> tokenizers.Tokenizer:
    added_texts = {entry["content"] for entry in added.values()}
    # strings that plain text must never produce: the old strings at re-used ids, and the
    # added tokens' own text (an added token is reached by matching, never by merging)
    forbidden = {text for text, token_id in vocab.items() if token_id in added} | added_texts
    model_vocab = {text: token_id for text, token_id in vocab.items() if text not in forbidden}
    # Added tokens sit in the model's vocabulary at their ids: tokenizers gives an added
    # token the id its text has in the model, so this is how the config's ids are kept.
    model_vocab.update({entry["content"]: token_id for token_id, entry in added.items()})
    kept_merges = [(a, b) for a, b in merges if a not in forbidden and b not in forbidden and a + b not in forbidden]
    try:
        backend = tokenizers.Tokenizer(
            models.BPE(vocab=model_vocab, merges=kept_merges, unk_token=None, fuse_unk=False, byte_fallback=False)
        )
    except Exception as e:
        raise TokenizerError(f"{where}: vocab.json and merges.txt do not fit together ({e})") from None
    _configure_qwen2(backend)
    for token_id, entry in sorted(added.items()):
        special = bool(entry.get("special", False))
        token = AddedToken(
            entry["content"],
            single_word=bool(entry.get("single_word", False)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", not special)),
            special=special,
        )
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(entry["content"]) != token_id:
            raise TokenizerError(
                f"{where}: added token {entry['content']!r} should have id {token_id}, "
                f"got {backend.token_to_id(entry['content'])} (is its text listed twice?)"
            )
    return backend
