"""The compact model against transformers' Qwen2_5_VLForConditionalGeneration (fp32, tiny checkpoint)."""

from pathlib import Path

import pytest
import torch
from torch.export import Dim
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from rexedge.runtime.model.checkpoint import load_model
from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.model.compact import KVCache, ModelInputError, RexOmniModel, VisionIndices
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.vision_layout import vision_layout

# (grid_h, grid_w) in patches: merged grid 5x3 (neither side a multiple of 4) and 4x8 (both are)
GRIDS = [(10, 6), (8, 16)]
DECODE_STEPS = 8
GREEDY_TOKENS = 16
RTOL = 1e-4


def close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    """Agreement relative to the reference's magnitude (logits of a random model straddle zero)."""
    assert ours.shape == ref.shape
    error = (ours - ref).abs().max().item()
    assert error <= rtol * ref.abs().max().item(), f"max error {error:.3g} vs scale {ref.abs().max().item():.3g}"


def published_names(hf_model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """transformers-5 parameter names mapped to the published checkpoint's names."""
    names = {}
    for name, tensor in hf_model.state_dict().items():
        name = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        names[name] = tuple(tensor.shape)
    if hf_model.config.tie_word_embeddings:
        names.pop("lm_head.weight")
    return names


def meta_models(cfg: RexOmniConfig) -> tuple[RexOmniModel, Qwen2_5_VLForConditionalGeneration]:
    with torch.device("meta"):
        return RexOmniModel(cfg), Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(cfg.to_hf_dict()))


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_names_are_the_published_ones(tied: bool) -> None:
    ours, ref = meta_models(RexOmniConfig.preset("tiny").replace(tie_word_embeddings=tied))
    assert {n: tuple(t.shape) for n, t in ours.state_dict().items()} == published_names(ref)
    assert ("lm_head.weight" in ours.state_dict()) is not tied


def count_from_shapes(cfg: RexOmniConfig) -> int:
    """Parameters of the architecture, written out from the layer shapes."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    layer = 2 * h + (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * cfg.intermediate_size
    text = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + cfg.num_hidden_layers * layer + h
    c, i = cfg.vision_hidden_size, cfg.vision_intermediate_size
    block = 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * (c * i + i) + (i * c + c)
    m = c * cfg.merge_unit
    merger = c + (m * m + m) + (m * cfg.vision_out_hidden_size + cfg.vision_out_hidden_size)
    return text + c * cfg.patch_dim + cfg.vision_depth * block + merger


def test_3b_preset_parameter_count_on_meta_device() -> None:
    cfg = RexOmniConfig.preset("rex-omni-3b")
    ours, ref = meta_models(cfg)
    assert all(p.is_meta for p in ours.parameters())
    expected = count_from_shapes(cfg)
    assert 3.70e9 < expected < 3.80e9
    assert sum(p.numel() for p in ours.parameters()) == expected
    assert sum(p.numel() for p in ref.parameters()) == expected


# --------------------------------------------------------------------------- tiny checkpoint


@pytest.fixture(scope="module")
def models(tiny_checkpoint: Path) -> tuple[RexOmniModel, Qwen2_5_VLForConditionalGeneration]:
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ours = load_model(tiny_checkpoint, dtype=torch.float32)
    return ours, ref


def make_prompt(cfg: RexOmniConfig, grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Random ordinary tokens around <|vision_start|> <|image_pad|> x N <|vision_end|>, as [1, T]."""
    num_image_tokens = grid[0] * grid[1] // cfg.merge_unit
    before = torch.randint(0, 2000, (7,), generator=generator)
    after = torch.randint(0, 2000, (11,), generator=generator)
    image = torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * num_image_tokens + [cfg.vision_end_token_id])
    return torch.cat([before, image, after])[None]


@pytest.fixture(scope="module", params=GRIDS, ids=lambda g: f"grid{g[0]}x{g[1]}")
def case(request: pytest.FixtureRequest, models: tuple) -> dict:
    ours, ref = models
    cfg = ours.config
    grid_h, grid_w = request.param
    generator = torch.Generator().manual_seed(grid_h * 1000 + grid_w)
    input_ids = make_prompt(cfg, (grid_h, grid_w), generator)
    patches = torch.randn(grid_h * grid_w, cfg.patch_dim, generator=generator)
    grid_thw = torch.tensor([[1, grid_h, grid_w]])
    mm_token_type_ids = (input_ids == cfg.image_token_id).int()
    position_ids, rope_deltas = ref.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=grid_thw)
    return dict(
        layout=vision_layout(grid_h, grid_w, cfg.spatial_merge_size, cfg.window_merged),
        input_ids=input_ids,
        patches=patches,
        grid_thw=grid_thw,
        mm_token_type_ids=mm_token_type_ids,
        position_ids=position_ids,
        rope_delta=int(rope_deltas[0, 0]),
        generator=generator,
    )


@torch.no_grad()
def test_vision_embeddings(models: tuple, case: dict) -> None:
    ours, ref = models
    expected = ref.model.get_image_features(case["patches"], case["grid_thw"]).pooler_output[0]
    got = ours.encode_image(case["patches"], case["layout"])
    assert got.shape == (case["layout"].num_tokens, ours.config.hidden_size)
    close(got, expected)


def reference_prefill(ref: Qwen2_5_VLForConditionalGeneration, case: dict):
    return ref(
        input_ids=case["input_ids"],
        pixel_values=case["patches"],
        image_grid_thw=case["grid_thw"],
        mm_token_type_ids=case["mm_token_type_ids"],
        use_cache=True,
    )


@torch.no_grad()
def test_prefill_and_decode_steps(models: tuple, case: dict) -> None:
    ours, ref = models
    input_ids = case["input_ids"]
    length = input_ids.shape[1]
    expected = reference_prefill(ref, case)

    cache = KVCache.allocate(ours.config, 1, length + DECODE_STEPS + 5)
    image_embeds = ours.encode_image(case["patches"], case["layout"])
    hidden = ours.prefill(input_ids, case["position_ids"], cache, image_embeds)
    close(ours.logits(hidden), expected.logits)

    # Teacher-forced random tokens, so each step sees a new context; transformers derives its
    # positions itself (rope_deltas), ours follow the documented rule: cache position + rope_delta.
    past = expected.past_key_values
    tokens = torch.randint(0, 2000, (DECODE_STEPS,), generator=case["generator"])
    for step, token in enumerate(tokens.tolist()):
        token_ids = torch.tensor([[token]])
        slot = length + step
        ref_step = ref(input_ids=token_ids, past_key_values=past, use_cache=True)
        past = ref_step.past_key_values
        positions = torch.full((3, 1, 1), slot + case["rope_delta"])
        out = ours.decode(ours.embed(token_ids), positions, cache, torch.tensor([slot]), kv_length=slot + 1)
        close(ours.logits(out), ref_step.logits)
        # the whole-buffer form (no kv_length: unfilled slots masked) gives the same answer
        again = KVCache([k.clone() for k in cache.keys], [v.clone() for v in cache.values])
        close(ours.decode(ours.embed(token_ids), positions, again, torch.tensor([slot])), out, rtol=1e-6)


@torch.no_grad()
def test_greedy_tokens_match_generate(models: tuple, case: dict) -> None:
    ours, ref = models
    input_ids = case["input_ids"]
    length = input_ids.shape[1]
    settings = GenerationConfig(
        do_sample=False, max_new_tokens=GREEDY_TOKENS, repetition_penalty=1.0,
        eos_token_id=None, pad_token_id=ours.config.eos_token_id,
    )
    generated = ref.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=case["patches"],
        image_grid_thw=case["grid_thw"],
        mm_token_type_ids=case["mm_token_type_ids"],
        generation_config=settings,
    )[0, length:].tolist()

    cache = KVCache.allocate(ours.config, 1, length + GREEDY_TOKENS)
    hidden = ours.prefill(input_ids, case["position_ids"], cache, ours.encode_image(case["patches"], case["layout"]))
    tokens = [int(ours.logits(hidden[:, -1]).argmax())]
    for slot in range(length, length + GREEDY_TOKENS - 1):
        positions = torch.full((3, 1, 1), slot + case["rope_delta"])
        hidden = ours.decode(ours.embed(torch.tensor([[tokens[-1]]])), positions, cache, torch.tensor([slot]), slot + 1)
        tokens.append(int(ours.logits(hidden[:, -1]).argmax()))
    assert tokens == generated
    assert len(set(tokens)) > 1, "the tiny checkpoint should not make greedy decoding repeat one token"


@torch.no_grad()
def test_restricted_head_equals_rows_of_full_head(models: tuple) -> None:
    ours, _ = models
    hidden = torch.randn(2, 3, ours.config.hidden_size, generator=torch.Generator().manual_seed(5))
    full = ours.logits(hidden)
    torch.testing.assert_close(ours.logits(hidden, slice(1000, 2000)), full[..., 1000:2000], rtol=1e-5, atol=1e-5)
    rows = torch.tensor([2002, 7, 1500, 1001])
    torch.testing.assert_close(ours.logits(hidden, rows), full[..., rows], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_batched_rows_match_single_rows(models: tuple, case: dict) -> None:
    """Two prompts of the same shape decoded as one batch give each row's own result."""
    ours, _ = models
    cfg = ours.config
    other = case["input_ids"].clone()
    text = other != cfg.image_token_id
    other[text] = torch.randint(0, 2000, (int(text.sum()),), generator=case["generator"])
    other[case["input_ids"] == cfg.vision_start_token_id] = cfg.vision_start_token_id
    other[case["input_ids"] == cfg.vision_end_token_id] = cfg.vision_end_token_id
    image_embeds = ours.encode_image(case["patches"], case["layout"])
    length = other.shape[1]

    batch_cache = KVCache.allocate(cfg, 2, length)
    batched = ours.prefill(torch.cat([case["input_ids"], other]), case["position_ids"].expand(3, 2, length),
                           batch_cache, torch.cat([image_embeds, image_embeds]))
    for row, ids in enumerate([case["input_ids"], other]):
        single = ours.prefill(ids, case["position_ids"], KVCache.allocate(cfg, 1, length), image_embeds)
        close(batched[row:row + 1], single, rtol=1e-5)


def test_mismatched_inputs_are_clear_errors(models: tuple, case: dict) -> None:
    ours, _ = models
    input_ids = case["input_ids"]
    length = input_ids.shape[1]
    cache = KVCache.allocate(ours.config, 1, length)
    image_embeds = torch.zeros(case["layout"].num_tokens - 1, ours.config.hidden_size)
    with pytest.raises(ModelInputError, match="image tokens"):
        ours.prefill(input_ids, case["position_ids"], cache, image_embeds)
    with pytest.raises(ModelInputError, match="max_length"):
        ours.prefill(input_ids, case["position_ids"], KVCache.allocate(ours.config, 1, length - 1))
    with pytest.raises(ModelInputError, match="position_ids"):
        ours.prefill(input_ids, case["position_ids"][:2], cache)
    with pytest.raises(RexEdgeError, match="pixel_patches"):
        ours.encode_image(case["patches"][:-4], case["layout"])


@torch.no_grad()
def test_half_precision_stays_close_to_fp32(tiny_checkpoint: Path, models: tuple, case: dict) -> None:
    ours32, _ = models
    ours16 = load_model(tiny_checkpoint, dtype=torch.float16)
    length = case["input_ids"].shape[1]
    logits = []
    for model in (ours32, ours16):
        dtype = next(model.parameters()).dtype
        cache = KVCache.allocate(model.config, 1, length, dtype=dtype)
        image_embeds = model.encode_image(case["patches"].to(dtype), case["layout"])
        hidden = model.prefill(case["input_ids"], case["position_ids"], cache, image_embeds)
        assert hidden.dtype == cache.keys[0].dtype == dtype
        logits.append(model.logits(hidden).float())
    close(logits[1], logits[0], rtol=3e-2)


def test_graphs_trace_with_dynamic_sizes(models: tuple) -> None:
    """No Python control flow on tensor values: one trace serves every grid and token count."""
    ours, _ = models
    cfg = ours.config
    generator = torch.Generator().manual_seed(11)

    def vision_inputs(grid_h: int, grid_w: int) -> tuple:
        indices = VisionIndices.from_layout(vision_layout(grid_h, grid_w))
        return (torch.randn(grid_h * grid_w, cfg.patch_dim, generator=generator), *indices)

    tokens, windows = Dim("tokens", min=2, max=4096), Dim("windows", min=1, max=1024)
    patches = 4 * tokens
    vision_shapes = ({0: patches}, {0: patches}, {0: patches}, {0: tokens}, {0: windows}, {0: windows}, {0: patches})
    traced_vision = torch.export.export(ours.visual, vision_inputs(6, 10), dynamic_shapes=vision_shapes).module()
    with torch.no_grad():
        other = vision_inputs(18, 14)
        close(traced_vision(*other), ours.visual(*other), rtol=1e-6)

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text = ours.model

        def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor,
                    keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
            return self.text(embeds, positions, keys, values, cache_position)

    def decoder_inputs(length: int, start: int) -> tuple:
        cache = KVCache.allocate(cfg, 2, 48)
        embeds = torch.randn(2, length, cfg.hidden_size, generator=generator)
        positions = torch.randint(0, 100, (3, 2, length), generator=generator)
        return embeds, positions, torch.arange(start, start + length), cache.keys, cache.values

    new = Dim("new", min=1, max=48)
    layers = [None] * cfg.num_hidden_layers
    decoder_shapes = ({1: new}, {2: new}, {0: new}, layers, layers)
    traced_decoder = torch.export.export(Decoder(), decoder_inputs(5, 0), dynamic_shapes=decoder_shapes).module()
    with torch.no_grad():
        for length, start in [(9, 0), (1, 20)]:
            inputs = decoder_inputs(length, start)
            fresh = [[t.clone() for t in group] for group in inputs[3:]]
            close(traced_decoder(*inputs), Decoder()(*inputs[:3], *fresh), rtol=1e-6)
