"""A small synthetic tokenizer in the layout of the published Rex-Omni checkpoint.

``write_tiny_tokenizer`` writes vocab.json + merges.txt + tokenizer_config.json (no
tokenizer.json) for the "tiny" preset's 2,048-row vocabulary:
- ids 0..255: the 256 byte-level symbols, in the order of the real Qwen2 vocabulary (so
  "," is 11, " " is 220 and "\\n" is 198 here as there);
- ids 256..1999: 1,744 merges of a byte-level BPE trained (deterministically) on a
  generated corpus of Rex-Omni prompts, categories and English-ish filler;
- ids 1000..1999 re-used as the coordinate tokens "<0>".."<999>": vocab.json keeps the
  original byte strings there and tokenizer_config.json's added_tokens_decoder maps the
  ids to "<i>" (special: false), as Rex-Omni did with the last 1,000 ordinary tokens;
- ids 2000..2021: the 22 Qwen special tokens in their real order (special: true);
  2022..2047 are padding rows of the embedding and have no token.

With ``num_ordinary=REAL_NUM_ORDINARY`` (151,643) the same tokenizer takes the real
vocabulary's layout, so that checkpoints of the real vocabulary size (151,936 rows) get the
real ids: the 2,000 trained tokens, then filler tokens up to id 151,642 (byte strings no
merge produces, so plain text never encodes to them), of which the last 1,000
(150643..151642) are re-used as "<0>".."<999>", and the 22 specials from 151643.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from rexedge.runtime.prompts import DEFAULT_SYSTEM_PROMPT, KEYPOINT_NAMES, build_prompt
from rexedge.runtime.tokenizer import NUM_COORDS, coord_text, qwen2_pre_tokenizer

NUM_ORDINARY = 2000
# the real Qwen2.5 vocabulary: ordinary ids 0..151642, <|endoftext|> at 151643
REAL_NUM_ORDINARY = 151643
# filler tokens are two tab bytes and a number: the corpus has no tabs, so no merge reaches them
_FILLER_PREFIX = "\u0109\u0109"
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
# the 13 Qwen2.5-VL lists as additional_special_tokens
ADDITIONAL_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS[1:14]

CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush", "door handle", "robot arm", "button", "search bar", "menu icon", "text", "word", "text line",
)  # fmt: skip
FILLER = (
    "the", "a", "of", "and", "to", "in", "is", "on", "with", "for", "at", "by", "from", "this", "that", "it",
    "image", "object", "objects", "box", "boxes", "point", "points", "left", "right", "top", "bottom", "red",
    "blue", "green", "small", "large", "near", "behind", "table", "window", "door", "street", "room", "None",
)  # fmt: skip
SYLLABLES = (
    "ka", "ro", "mi", "te", "sa", "lo", "ne", "ви", "да", "東", "京", "ar", "en", "is", "or", "un", "qu", "th",
    "st", "pl", "é", "ü", "ß", "ñ", "ing", "ed", "er", "tion", "ly", "ment",
)  # fmt: skip


def write_tiny_tokenizer(out_dir: Path, num_ordinary: int = NUM_ORDINARY) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json into ``out_dir`` (created if needed).

    ``num_ordinary``: ordinary ids before the specials; the last 1,000 of them are the
    coordinate tokens (2,000 for "tiny", ``REAL_NUM_ORDINARY`` for the real layout)."""
    if num_ordinary < NUM_ORDINARY:
        raise ValueError(f"num_ordinary must be at least {NUM_ORDINARY}, got {num_ordinary}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train_byte_level_bpe(_corpus(), NUM_ORDINARY)
    vocab.update({f"{_FILLER_PREFIX}{i}": i for i in range(NUM_ORDINARY, num_ordinary)})
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(num_ordinary), indent=2),
                                                   encoding="utf-8")


def _tokenizer_config(num_ordinary: int) -> dict:
    def entry(content: str, special: bool) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": special}  # fmt: skip

    first_coord = num_ordinary - NUM_COORDS
    decoder = {str(first_coord + i): entry(coord_text(i), False) for i in range(NUM_COORDS)}
    decoder.update({str(num_ordinary + i): entry(text, True) for i, text in enumerate(QWEN_SPECIAL_TOKENS)})
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _corpus(seed: int = 0) -> list[str]:
    """Prompts of every task (weighted, so their words merge early), outputs, and filler text."""
    rng = random.Random(seed)
    # the chat template's text and the "None" answer, often enough to become whole tokens
    lines = [f"system\n{DEFAULT_SYSTEM_PROMPT}", "user\n", "assistant\n", "None, None"] * 300
    for _ in range(600):
        categories = rng.sample(CATEGORIES, rng.randint(1, 3))
        lines.append(build_prompt("detection", categories))
        lines.append(build_prompt(rng.choice(("pointing", "ocr_box", "ocr_polygon", "gui_grounding", "gui_pointing")),
                                  categories))  # fmt: skip
        lines.append(build_prompt("keypoint", categories[:1], rng.choice(sorted(KEYPOINT_NAMES))))
        width, height = rng.randint(50, 2000), rng.randint(50, 2000)
        (x0, x1), (y0, y1) = sorted(rng.uniform(0, width) for _ in "xx"), sorted(rng.uniform(0, height) for _ in "yy")
        lines.append(
            build_prompt("visual_prompting", visual_prompt_boxes=[[x0, y0, x1, y1]], image_size=(width, height))
        )
        lines.append(", ".join(f"{c} None" for c in categories) + f" {rng.randint(0, 99999)}")
    for _ in range(6000):
        words = [rng.choice(FILLER + CATEGORIES) if rng.random() < 0.5 else _pseudo_word(rng)
                 for _ in range(rng.randint(3, 12))]  # fmt: skip
        lines.append(" ".join(words) + rng.choice((".", ",", "?", "!", "\n", ": 12", " (3)")))
    return lines


def _pseudo_word(rng: random.Random) -> str:
    word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
    return word.capitalize() if rng.random() < 0.2 else word


def _train_byte_level_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a Qwen2-style byte-level BPE; ids: the byte symbols in Qwen2's order, then merges in order."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = qwen2_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    trained = json.loads(backend.to_str())["model"]["merges"]
    # tokenizers writes a merge as "a b" or, since 0.20, as ["a", "b"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained]
    if len(merges) != vocab_size - len(alphabet):
        raise RuntimeError(f"the tiny corpus gave {len(merges)} merges, expected {vocab_size - len(alphabet)}")
    # GPT-2 / Qwen2 order the byte symbols printable bytes first, then the others mapped
    # to U+0100 and up, each group by byte value: that is code-point order.
    tokens = sorted(alphabet) + [a + b for a, b in merges]
    return {token: token_id for token_id, token in enumerate(tokens)}, merges
