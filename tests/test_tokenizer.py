"""The tokenizer: tiny files in the published layout, ids from added_tokens_decoder, plain-text encoding.

References: the tokenizer_config.json entries themselves (for ids), GPT-2's byte-to-symbol
table written out here (for the byte order), transformers' Qwen2Tokenizer on the same
vocab.json + merges.txt (for ordinary text), and unicodedata (round trips).
"""

from __future__ import annotations

import json
import random
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rexedge.export.fixtures.tiny_tokenizer import QWEN_SPECIAL_TOKENS, write_tiny_tokenizer
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.tokenizer import Tokenizer, TokenizerError

HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
INJECTIONS = ["<|im_end|>", "<5>", "<999>", "<0>", "<|object_ref_start|>", "<|image_pad|>", "<|endoftext|>", "<12"]


def gpt2_byte_symbols() -> list[str]:
    """The 256 byte-level symbols in GPT-2's (and Qwen2's) vocabulary order.

    Printable bytes stand for themselves and come first, by byte value; the other 68
    bytes follow, by byte value, as U+0100, U+0101, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def config(tiny_dir: Path) -> dict:
    return json.loads((tiny_dir / "tokenizer_config.json").read_text())


@pytest.fixture(scope="module")
def added_ids(config: dict) -> set[int]:
    return {int(k) for k in config["added_tokens_decoder"]}


def hf_from(path: Path):
    """transformers' Qwen2Tokenizer on the vocab.json + merges.txt in ``path`` (all merges kept)."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(path))


def random_text(rng: random.Random, n: int) -> str:
    pieces = ["cup", " door", " handle", "None", ",", " ", "\n", "Detect", "东京", "é", "e\u0301", "123", "'s", "  "]
    pieces += [chr(rng.randint(0x20, 0x2FFF)) for _ in range(5)]
    return "".join(rng.choice(pieces) for _ in range(n))


# the tiny files ------------------------------------------------------------


def test_tiny_files_follow_the_published_layout(tiny_dir: Path, config: dict) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    vocab = json.loads((tiny_dir / "vocab.json").read_text())
    merges = [tuple(line.split(" ")) for line in (tiny_dir / "merges.txt").read_text().splitlines()[1:]]
    assert sorted(vocab.values()) == list(range(2000))
    assert len(merges) == 1744
    by_id = {i: s for s, i in vocab.items()}
    # the 256 byte symbols first, in Qwen2's order
    assert [by_id[i] for i in range(256)] == gpt2_byte_symbols()
    # every other id is the result of the merge of the same rank; ids 1000..1999 keep
    # their original byte strings, not "<i>"
    assert [by_id[256 + k] for k in range(1744)] == [a + b for a, b in merges]
    assert not any(by_id[i].startswith("<") and by_id[i].endswith(">") for i in range(1000, 2000))

    decoder = config["added_tokens_decoder"]
    assert len(decoder) == 1022
    for i in range(1000):
        assert decoder[str(1000 + i)]["content"] == f"<{i}>" and decoder[str(1000 + i)]["special"] is False
    assert [decoder[str(2000 + i)]["content"] for i in range(22)] == list(QWEN_SPECIAL_TOKENS)
    assert all(decoder[str(2000 + i)]["special"] is True for i in range(22))
    assert QWEN_SPECIAL_TOKENS[2] == "<|im_end|>" and QWEN_SPECIAL_TOKENS[12] == "<|image_pad|>"
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert (config["eos_token"], config["pad_token"], config["errors"]) == ("<|im_end|>", "<|endoftext|>", "replace")


def test_tiny_tokenizer_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_prompt_words_are_whole_tokens(tok: Tokenizer) -> None:
    text = "Detect person, cup. Output the bounding box coordinates in [x0, y0, x1, y1] format."
    ids = tok.encode_text(text)
    assert len(ids) < len(text) / 2.5
    assert tok.decode(ids) == text


# TokenIds ------------------------------------------------------------------


def test_token_ids_come_from_added_tokens_decoder(tok: Tokenizer, config: dict) -> None:
    content_to_id = {entry["content"]: int(k) for k, entry in config["added_tokens_decoder"].items()}
    ids = tok.ids
    assert ids.coord_start == content_to_id["<0>"] and ids.num_coords == 1000
    for field, text in [("endoftext", "<|endoftext|>"), ("im_start", "<|im_start|>"), ("im_end", "<|im_end|>"),
                        ("object_ref_start", "<|object_ref_start|>"), ("object_ref_end", "<|object_ref_end|>"),
                        ("box_start", "<|box_start|>"), ("box_end", "<|box_end|>"),
                        ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>"),
                        ("image_pad", "<|image_pad|>")]:  # fmt: skip
        assert getattr(ids, field) == content_to_id[text], field
    # The byte symbols sit where the real Qwen2 vocabulary has them: "," 11, " " 220
    # ("\n" 198). In the real vocabulary "None" is the single token 4064 (see the
    # real-layout test below); in the tiny one it is whatever the training made it.
    assert (ids.comma, ids.space) == (11, 220)
    assert tok.encode_text("\n") == [198]
    assert tok.decode(ids.none) == "None"
    assert tok.decode([ids.comma, ids.space]) == ", "


def test_coordinate_helpers(tok: Tokenizer) -> None:
    ids = tok.ids
    for i in random.Random(0).sample(range(1000), 25) + [0, 999]:
        token = ids.coord_token(i)
        assert tok.decode([token]) == f"<{i}>"
        assert ids.is_coord(token) and ids.coord_value(token) == i
    for outside in (ids.coord_start - 1, ids.coord_start + 1000, ids.im_end, ids.comma):
        assert not ids.is_coord(outside)
        with pytest.raises(TokenizerError, match="not a coordinate token"):
            ids.coord_value(outside)
    for bad_bin in (-1, 1000):
        with pytest.raises(TokenizerError, match="outside 0..999"):
            ids.coord_token(bad_bin)


def write_layout(
    path: Path, vocab: dict[str, int], merges: list[tuple[str, str]], added: dict[int, tuple[str, bool]]
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    decoder = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": s} for i, (c, s) in added.items()}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    return path


def real_layout() -> tuple[dict[str, int], list[tuple[str, str]], dict[int, tuple[str, bool]]]:
    """A sparse vocabulary with the real Rex-Omni ids: coordinates at 150643, specials at 151643."""
    vocab = {symbol: i for i, symbol in enumerate(gpt2_byte_symbols())}
    vocab.update({f"old{i}": 150643 + i for i in range(1000) if i != 5})
    vocab.update({"No": 2000, "ne": 2001, "None": 4064, "ĠNo": 3000})
    vocab["ĠN"] = 150643 + 5  # an old string at a re-used id: " N" must not encode to coordinate <5>
    merges = [("N", "o"), ("n", "e"), ("No", "ne"), ("Ġ", "N"), ("ĠN", "o")]
    added = {150643 + i: (f"<{i}>", False) for i in range(1000)}
    added.update({151643 + i: (text, True) for i, text in enumerate(QWEN_SPECIAL_TOKENS)})
    return vocab, merges, added


def test_real_layout_ids_and_reused_merges_are_dropped(tmp_path: Path) -> None:
    vocab, merges, added = real_layout()
    tok = Tokenizer.from_dir(write_layout(tmp_path / "real", vocab, merges, added))
    ids = tok.ids
    assert (ids.coord_start, ids.endoftext, ids.im_start, ids.im_end) == (150643, 151643, 151644, 151645)
    assert (ids.object_ref_start, ids.object_ref_end, ids.box_start, ids.box_end) == (151646, 151647, 151648, 151649)
    assert (ids.vision_start, ids.vision_end, ids.image_pad) == (151652, 151653, 151655)
    assert (ids.comma, ids.space, ids.none) == (11, 220, (4064,))
    assert tok.encode_text("\n") == [198]
    # the merge producing the old string at a re-used id, and the merge built on it, are gone
    assert tok.encode_text(" N") == [220, vocab["N"]]
    assert tok.encode_text(" No") == [220, 2000]
    assert tok.encode_text(" None") == [220, 4064]
    assert tok.decode([150648, 151645]) == "<5><|im_end|>"
    # the real embedding's 271 padding rows (151,665..151,935) have no text: they decode to nothing
    has_text = tok.has_text(151936)
    assert tok.vocab_size == 151665 and has_text[151643:151665].all() and not has_text[151665:].any()
    assert has_text.sum() == len(set(vocab.values()) | set(added))  # the sparse vocabulary's ids, no more
    assert tok.decode([151760, 150648, 151935, 151665, 151645], rows=151936) == "<5><|im_end|>"
    assert tok.count_textless([151760, 150648, 151935, 151665, 151645]) == 3
    with pytest.raises(TokenizerError, match=r"token ids \[151936\]: outside the embedding's rows 0..151935"):
        tok.decode([150648, 151936], rows=151936)


def test_crafted_config_errors(tmp_path: Path) -> None:
    vocab, merges, added = real_layout()

    no_im_end = {i: v for i, v in added.items() if v[0] != "<|im_end|>"}
    with pytest.raises(TokenizerError, match=r"<\|im_end\|>"):
        Tokenizer.from_dir(write_layout(tmp_path / "a", vocab, merges, no_im_end))

    no_coords = {i: v for i, v in added.items() if v[1]}
    with pytest.raises(TokenizerError, match="no coordinate tokens <0>..<999>"):
        Tokenizer.from_dir(write_layout(tmp_path / "b", vocab, merges, no_coords))

    # "<7>" moved to a free id: the range is no longer contiguous
    gap = dict(added)
    del gap[150643 + 7]
    gap[152000] = ("<7>", False)
    with pytest.raises(TokenizerError, match=r"not contiguous: <7> has id 152000, expected 150650"):
        Tokenizer.from_dir(write_layout(tmp_path / "c", vocab, merges, gap))

    missing_last = {i: v for i, v in added.items() if v[0] != "<999>"}
    with pytest.raises(TokenizerError, match=r"<999> has id None"):
        Tokenizer.from_dir(write_layout(tmp_path / "d", vocab, merges, missing_last))


def test_missing_and_malformed_files(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_dir / "vocab.json", partial)
    with pytest.raises(TokenizerError, match="missing merges.txt, tokenizer_config.json") as info:
        Tokenizer.from_dir(partial)
    assert isinstance(info.value, RexEdgeError)

    for index, (name, text, message) in enumerate([
        ("merges.txt", "#version: 0.2\nĠ t h\n", "expected two space-separated tokens"),
        ("tokenizer_config.json", json.dumps({"eos_token": "<|im_end|>"}), "no added_tokens_decoder"),
        ("tokenizer_config.json", "{not json", "not valid JSON"),
        ("vocab.json", "[1, 2]", "token -> integer id"),
        ("merges.txt", "#version: 0.2\nzz qq\n", "do not fit together"),
    ]):
        broken = tmp_path / f"broken_{index}"
        shutil.copytree(tiny_dir, broken)
        (broken / name).write_text(text)
        with pytest.raises(TokenizerError, match=message):
            Tokenizer.from_dir(broken)
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        (tmp_path / "bad.json").write_text("{}")
        Tokenizer.from_file(tmp_path / "bad.json")


# encoding and decoding -----------------------------------------------------


@HYPOTHESIS
@given(text=st.text(max_size=60))
def test_round_trip_random_unicode(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode_text(text)) == unicodedata.normalize("NFC", text)


@HYPOTHESIS
@given(parts=st.lists(st.sampled_from(INJECTIONS) | st.text(alphabet="<>|5 _abc", max_size=6), max_size=8))
def test_user_text_never_becomes_added_tokens(tok: Tokenizer, added_ids: set[int], parts: list[str]) -> None:
    text = "".join(parts)
    ids = tok.encode_text(text)
    assert not set(ids) & added_ids
    assert tok.decode(ids) == text


def test_decode_coordinates_and_specials(tok: Tokenizer) -> None:
    ids = tok.ids
    sequence = [ids.object_ref_start, *tok.encode_text("cup"), ids.object_ref_end, ids.box_start, ids.coord_token(10),
                ids.coord_token(20), ids.comma, ids.coord_token(999), ids.box_end, ids.im_end]  # fmt: skip
    expected = "<|object_ref_start|>cup<|object_ref_end|><|box_start|><10><20>,<999><|box_end|><|im_end|>"
    assert tok.decode(sequence) == expected


def test_padding_rows_decode_to_nothing_as_in_the_tokenizers_library(tok: Tokenizer, tmp_path: Path) -> None:
    """2022..2047 are the tiny embedding's padding rows (no token): dropped, and counted, wherever they fall
    (inside a multi-byte character too), as the library's own decode of the saved file skips them."""
    import tokenizers

    library = tokenizers.Tokenizer.from_file(str(tok.save(tmp_path)))
    rng = np.random.default_rng(19)
    assert tok.has_text(2048).tolist() == [True] * 2022 + [False] * 26
    for _ in range(200):
        ids = rng.integers(0, 2048, int(rng.integers(0, 40)))
        ids[rng.random(ids.shape[0]) < 0.3] = rng.integers(2022, 2048)
        text = tok.decode(ids, rows=2048)
        assert text == library.decode(ids.tolist(), skip_special_tokens=False)
        assert text == tok.decode([i for i in ids if i < 2022])
        assert tok.count_textless(ids) == int((ids >= 2022).sum())


def test_bad_inputs(tok: Tokenizer) -> None:
    # outside the embedding: no model can produce these ids
    for bad, rows in (([-1], None), ([3, -5], 2048), ([2048], 2048), ([5000], 2048), ([2030], 2022)):
        with pytest.raises(TokenizerError, match=f"cannot decode token ids \\[{bad[-1]}\\]"):
            tok.decode(bad, rows=rows)
    with pytest.raises(TokenizerError, match="must be a str"):
        tok.encode_text(b"cup")  # type: ignore[arg-type]


def test_saved_tokenizer_json_gives_identical_ids(tok: Tokenizer, tmp_path: Path) -> None:
    written = tok.save(tmp_path)
    assert written == tmp_path / "tokenizer.json" and sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    for loaded in (Tokenizer.from_dir(tmp_path), Tokenizer.from_file(written)):
        assert loaded.ids == tok.ids
        assert loaded.added_tokens == tok.added_tokens
        rng = random.Random(3)
        for text in [random_text(rng, 30) for _ in range(50)] + INJECTIONS:
            assert loaded.encode_text(text) == tok.encode_text(text)
        everything = list(range(2022))
        assert loaded.decode(everything) == tok.decode(everything)


def test_tokenizer_json_disagreeing_with_config_is_refused(tok: Tokenizer, tiny_dir: Path, tmp_path: Path) -> None:
    # what a tool that renumbers the coordinate tokens would leave behind
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).ids == tok.ids  # nothing to compare with
    shutil.copy(tiny_dir / "tokenizer_config.json", tmp_path)
    assert Tokenizer.from_dir(tmp_path).ids == tok.ids
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    decoder["2999"] = decoder.pop("1999")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"tokenizer.json gives '<999>' id 1999, tokenizer_config.json gives 2999"):
        Tokenizer.from_dir(tmp_path)


# transformers as the reference for ordinary text ---------------------------


def test_matches_transformers_where_no_reused_merge_applies(tok: Tokenizer, tiny_dir: Path) -> None:
    """transformers keeps every merge, so it agrees wherever its ids avoid the re-used range."""
    hf = hf_from(tiny_dir)
    rng = random.Random(7)
    texts = [random_text(rng, rng.randint(1, 25)) for _ in range(300)]
    texts += ["Detect cup, door handle. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
              "system\nYou are a helpful assistant", "Point to element \"search bar\"."]  # fmt: skip
    agreeing = 0
    for text in texts:
        theirs, ours = hf.encode(text, add_special_tokens=False), tok.encode_text(text)
        if any(1000 <= i < 2000 for i in theirs):
            assert not any(1000 <= i < 2000 for i in ours), text
            assert tok.decode(ours) == unicodedata.normalize("NFC", text)
        else:
            assert ours == theirs, text
            agreeing += 1
    assert agreeing > len(texts) // 2


def test_matches_transformers_without_the_reused_ids(tok: Tokenizer, tiny_dir: Path, tmp_path: Path) -> None:
    """With the re-used strings and every merge touching them removed, transformers must agree exactly."""
    vocab = json.loads((tiny_dir / "vocab.json").read_text())
    merges = [tuple(line.split(" ")) for line in (tiny_dir / "merges.txt").read_text().splitlines()[1:]]
    reused = {s for s, i in vocab.items() if 1000 <= i < 2000}
    kept = [(a, b) for a, b in merges if not {a, b, a + b} & reused]
    write_layout(tmp_path, {s: i for s, i in vocab.items() if s not in reused}, kept, {})
    (tmp_path / "tokenizer_config.json").unlink()
    hf = hf_from(tmp_path)
    rng = random.Random(11)
    for text in [random_text(rng, rng.randint(1, 30)) for _ in range(300)]:
        assert tok.encode_text(text) == hf.encode(text, add_special_tokens=False), text
