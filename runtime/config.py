"""One config for the whole model: the Qwen2.5-VL text decoder and vision encoder.

Read from a checkpoint's ``config.json`` in either layout seen in the wild:
- flat (the published Rex-Omni / Qwen2.5-VL checkpoints): text fields at the top,
  ``vision_config`` nested, ``rope_scaling.mrope_section``;
- nested (recent transformers): ``text_config`` and ``vision_config``, with
  ``rope_parameters`` holding ``rope_theta`` and ``mrope_section``.
Written back (``to_hf_dict``) in the flat, published layout.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rexedge.runtime.errors import RexEdgeError


class ConfigError(RexEdgeError, ValueError):
    """A config.json that is missing fields or describes something we cannot run."""


@dataclass(frozen=True)
class RexOmniConfig:
    # text decoder
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    # vision encoder
    vision_depth: int = 32
    vision_hidden_size: int = 1280
    vision_num_heads: int = 16
    vision_intermediate_size: int = 3420
    vision_out_hidden_size: int = 2048
    vision_rope_theta: float = 1e4
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    # token ids the vision side needs (the tokenizer files stay authoritative for text)
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int = 151645
    # the dtype the checkpoint stores its weights in
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        checks = [
            (self.hidden_size % self.num_attention_heads == 0, "hidden_size must divide by num_attention_heads"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must divide by num_key_value_heads"),
            (2 * sum(self.mrope_section) == self.head_dim,
             f"2 * sum(mrope_section) = {2 * sum(self.mrope_section)} must equal head_dim = {self.head_dim}"),
            (self.vision_hidden_size % self.vision_num_heads == 0,
             "vision_hidden_size must divide by vision_num_heads"),
            (self.vision_head_dim % 4 == 0, "vision head_dim must divide by 4 (2-D rotary, rotate-half)"),
            (self.vision_out_hidden_size == self.hidden_size,
             f"vision_out_hidden_size {self.vision_out_hidden_size} != hidden_size {self.hidden_size}"),
            (self.window_size % (self.patch_size * self.spatial_merge_size) == 0,
             "window_size must be a multiple of patch_size * spatial_merge_size"),
            (all(0 <= i < self.vision_depth for i in self.fullatt_block_indexes),
             f"fullatt_block_indexes {self.fullatt_block_indexes} outside 0..{self.vision_depth - 1}"),
            (self.torch_dtype in ("float32", "float16", "bfloat16"), f"unknown torch_dtype {self.torch_dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    # derived ---------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden_size // self.vision_num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one pixel-patch row: channels x frames x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        """Patches merged into one image token (4)."""
        return self.spatial_merge_size ** 2

    @property
    def image_factor(self) -> int:
        """Image sides are multiples of this many pixels (28)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def window_merged(self) -> int:
        """Side of an attention window in merged tokens (4)."""
        return self.window_size // self.image_factor

    # presets ---------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "RexOmniConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None

    def replace(self, **changes: Any) -> "RexOmniConfig":
        return dataclasses.replace(self, **changes)

    # config.json -----------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RexOmniConfig":
        """Parse either config.json layout (see the module docstring)."""
        text = d.get("text_config") or d
        vision = d.get("vision_config")
        if vision is None:
            raise ConfigError("config.json has no vision_config: not a Qwen2.5-VL / Rex-Omni checkpoint")
        rope = text.get("rope_parameters") or d.get("rope_parameters") or text.get("rope_scaling") or d.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ConfigError("config.json has no mrope_section (looked in rope_scaling and rope_parameters)")
        rope_theta = rope.get("rope_theta", text.get("rope_theta", d.get("rope_theta")))
        if rope_theta is None:
            raise ConfigError("config.json has no rope_theta")
        vision_rope = vision.get("rope_parameters") or {}

        def need(src: dict[str, Any], key: str, where: str) -> Any:
            if key not in src:
                raise ConfigError(f"config.json is missing {where}{key}")
            return src[key]

        t = "text_config." if text is not d else ""
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        return cls(
            vocab_size=need(text, "vocab_size", t),
            hidden_size=need(text, "hidden_size", t),
            intermediate_size=need(text, "intermediate_size", t),
            num_hidden_layers=need(text, "num_hidden_layers", t),
            num_attention_heads=need(text, "num_attention_heads", t),
            num_key_value_heads=need(text, "num_key_value_heads", t),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            mrope_section=tuple(rope["mrope_section"]),
            max_position_embeddings=text.get("max_position_embeddings", 128000),
            tie_word_embeddings=bool(tie),
            vision_depth=need(vision, "depth", "vision_config."),
            vision_hidden_size=need(vision, "hidden_size", "vision_config."),
            vision_num_heads=need(vision, "num_heads", "vision_config."),
            vision_intermediate_size=need(vision, "intermediate_size", "vision_config."),
            vision_out_hidden_size=need(vision, "out_hidden_size", "vision_config."),
            vision_rope_theta=float(vision_rope.get("rope_theta", 1e4)),
            in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
            patch_size=vision.get("patch_size", 14),
            temporal_patch_size=vision.get("temporal_patch_size", 2),
            spatial_merge_size=vision.get("spatial_merge_size", 2),
            window_size=vision.get("window_size", 112),
            fullatt_block_indexes=tuple(need(vision, "fullatt_block_indexes", "vision_config.")),
            image_token_id=d.get("image_token_id", 151655),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            eos_token_id=text.get("eos_token_id", d.get("eos_token_id", 151645)),
            torch_dtype=str(d.get("torch_dtype", d.get("dtype", text.get("dtype"))) or "bfloat16").replace("torch.", ""),
            extra={k: v for k, v in d.items() if k not in ("text_config", "vision_config")},
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "RexOmniConfig":
        """Read ``config.json`` (or the config.json inside a checkpoint directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json here (expected a Rex-Omni checkpoint directory)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The flat layout of the published checkpoint's config.json."""
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "attention_dropout": 0.0,
            "bos_token_id": 151643 if self.vocab_size > 151643 else self.eos_token_id,
            "eos_token_id": self.eos_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "image_token_id": self.image_token_id,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
            "vision_config": {
                "depth": self.vision_depth,
                "hidden_act": "silu",
                "hidden_size": self.vision_hidden_size,
                "intermediate_size": self.vision_intermediate_size,
                "num_heads": self.vision_num_heads,
                "in_chans": self.in_channels,
                "out_hidden_size": self.vision_out_hidden_size,
                "patch_size": self.patch_size,
                "spatial_merge_size": self.spatial_merge_size,
                "spatial_patch_size": self.patch_size,
                "window_size": self.window_size,
                "fullatt_block_indexes": list(self.fullatt_block_indexes),
                "tokens_per_second": 2,
                "temporal_patch_size": self.temporal_patch_size,
            },
        }


PRESETS: dict[str, RexOmniConfig] = {
    "rex-omni-3b": RexOmniConfig(),
    # The real architecture and vocabulary (151,936 rows, the real token ids) at a size a
    # CPU decodes in tens of ms per token: 210M parameters, of which 117M are the tied
    # embedding, so the full head dominates a step as it does on small devices. For benchmarks.
    "cpu-bench": RexOmniConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        vision_depth=8,
        vision_hidden_size=384,
        vision_num_heads=6,
        vision_intermediate_size=1024,
        vision_out_hidden_size=768,
        fullatt_block_indexes=(3, 7),
        torch_dtype="float32",
    ),
    # Same architecture, test-sized. The vocabulary is a small synthetic byte-level BPE
    # (rexedge.export.fixtures.tiny_tokenizer) laid out like the real one: ordinary tokens 0..1999
    # of which the last 1,000 (1000..1999) are re-used as <0>..<999>, then the 22 Qwen
    # specials from 2000 (<|endoftext|>), padded to 2,048 rows.
    "tiny": RexOmniConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 3, 3),
        max_position_embeddings=4096,
        vision_depth=4,
        vision_hidden_size=32,
        vision_num_heads=2,
        vision_intermediate_size=48,
        vision_out_hidden_size=64,
        fullatt_block_indexes=(1, 3),
        image_token_id=2012,
        vision_start_token_id=2009,
        vision_end_token_id=2010,
        eos_token_id=2002,
        torch_dtype="float32",
    ),
}

# The trained embedded default (rexedge.export.shapes.train): the "tiny" vocabulary, sized
# for a few CPU hours of training on generated shapes. The rotary must do two things at once.
# In M-RoPE the frequencies are theta^(-i/(head_dim/2)) and the width stream takes the *last*
# (lowest) ones, the height stream the ones before, the time stream the highest.
# 1. Resolve image columns and rows: the decoder reads an image token's absolute (row, col)
#    from its rotary offset to <|vision_start|>, so the width stream's highest frequency must
#    turn visibly per column (head_dim 32 / theta 1e6 / (4, 6, 6), the first try: 1.8e-4 rad).
# 2. Keep some nearly position-free dimensions for content look-ups over the ~100-250 tokens
#    between the answer and the image ("where is the red circle?"): frequencies well under
#    1/250 rad per token. theta 100 with (4, 12, 16) did 1 (width 0.1 .. 0.012 rad per column)
#    but not 2: its lowest frequency turns ~3 rad over 250 tokens, and a run learned position,
#    format and box sizes but never which category is where.
# theta 1000 with (2, 8, 22): width 0.115 .. 0.0012 rad per column (0.3 rad over 250 tokens),
# height 0.65 .. 0.14 rad per row.
PRESETS["shapes"] = PRESETS["tiny"].replace(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=1000.0,
    mrope_section=(2, 8, 22),
    vision_depth=4,
    vision_hidden_size=128,
    vision_num_heads=2,
    vision_intermediate_size=256,
    vision_out_hidden_size=256,
    fullatt_block_indexes=(1, 3),
)
# "shapes" with more position-free room for the content look-up (run J, theta 1000: only the last
# four width frequencies, <= 0.0024 rad per token, stay under ~0.7 rad over 300 tokens, and the answer's
# query at <|box_start|> found the named shape with half its attention). theta 1e4 with (2, 4, 26):
# time 1 .. 0.75, height 0.56 .. 0.24 rad per row (<= 4 rad over 16 rows: no wrap), width 0.18 .. 1.3e-4
# rad per column, of which the last eleven frequencies are <= 0.0024.
PRESETS["shapes2"] = PRESETS["shapes"].replace(rope_theta=10000.0, mrope_section=(2, 4, 26))
