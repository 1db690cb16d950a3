"""The compact Rex-Omni model (Qwen2.5-VL-3B architecture), written for export.

Parameter names are the published checkpoint's (``model.layers.*``, ``visual.blocks.*``),
so a checkpoint loads with ``load_state_dict`` after renaming only transformers-5 names.
Everything that varies per image or per step is a forward argument: the vision index
tensors (from :func:`rexedge.runtime.request.vision_layout.vision_layout`), the three M-RoPE
position streams, the KV cache and the cache positions. Nothing in a forward depends on
tensor values through Python control flow, so the graphs trace with dynamic shapes.

The runtime owns the KV cache: per layer ``[B, kv_heads, max_length, head_dim]`` buffers,
written in place at ``cache_position`` (the same slots for every batch row). Attention
reads the first ``kv_length`` slots (all of them when not given) under a mask that lets
the token at slot ``p`` see slots ``0..p``.

The head is separate from the decoder: ``logits(hidden, rows)`` multiplies only the
requested rows of the (tied) embedding, e.g. the 1,000 coordinate tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.vision_layout import VisionLayout

# The vision tower's norms use this eps whatever the text config's rms_norm_eps says.
VISION_NORM_EPS = 1e-6


class ModelInputError(RexEdgeError, ValueError):
    """Inputs to the compact model that do not fit together."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype: the order the checkpoint was trained with.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def inverse_frequencies(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2, in fp32 (computed in the graph, so no buffer to load)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


# --------------------------------------------------------------------------- vision


class VisionIndices(NamedTuple):
    """A :class:`VisionLayout`'s arrays as tensors, in the vision encoder's argument order."""

    rotary_pos: torch.Tensor  # [N, 2] int64, processor row order
    patch_order: torch.Tensor  # [N] int64, window order -> processor row
    reverse_index: torch.Tensor  # [N/4] int64, raster -> window order of merged tokens
    window_gather: torch.Tensor  # [W, P] int64
    window_valid: torch.Tensor  # [W, P] bool
    window_unpad: torch.Tensor  # [N] int64

    @classmethod
    def from_layout(cls, layout: VisionLayout, device: torch.device | str | None = None) -> "VisionIndices":
        return cls(*(torch.from_numpy(getattr(layout, name).copy()).to(device) for name in cls._fields))


def vision_rotary(rotary_pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, head_dim] from each patch's (row, col): [row freqs, col freqs] twice over."""
    inv_freq = inverse_frequencies(head_dim // 2, theta, rotary_pos.device)
    angles = (rotary_pos[..., None].float() * inv_freq).flatten(1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class PatchEmbed(nn.Module):
    def __init__(self, cfg: RexOmniConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # Kept as a Conv3d for the checkpoint's weight name and shape; with kernel == stride
        # over a whole patch it is a linear map of each flattened patch row.
        self.proj = nn.Conv3d(cfg.in_channels, cfg.vision_hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixel_patches.to(weight.dtype), weight.reshape(weight.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: RexOmniConfig) -> None:
        super().__init__()
        dim = cfg.vision_hidden_size
        self.num_heads = cfg.vision_num_heads
        self.head_dim = cfg.vision_head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        window_gather: torch.Tensor | None,
        window_valid: torch.Tensor | None,
        window_unpad: torch.Tensor | None,
    ) -> torch.Tensor:
        n, dim = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        if window_gather is None:
            out = dense_attention(q, k, v)
        else:
            out = windowed_attention(q, k, v, window_gather, window_valid, window_unpad)
        return self.proj(out.reshape(n, dim))


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention over all N patches; q/k/v and the result are [N, heads, head_dim]."""
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1)


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_gather: torch.Tensor,
    window_valid: torch.Tensor,
    window_unpad: torch.Tensor,
) -> torch.Tensor:
    """Attention inside each window, as one padded batch [W, heads, P, head_dim]: O(N x P)."""
    q, k, v = (t[window_gather].transpose(1, 2) for t in (q, k, v))
    key_mask = window_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    num_windows, heads, slots, head_dim = out.shape
    # Padding slots computed garbage queries; only the real slots are gathered back.
    return out.transpose(1, 2).reshape(num_windows * slots, heads, head_dim)[window_unpad]


class VisionMLP(nn.Module):
    def __init__(self, cfg: RexOmniConfig) -> None:
        super().__init__()
        dim, hidden = cfg.vision_hidden_size, cfg.vision_intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: RexOmniConfig, full_attention: bool) -> None:
        super().__init__()
        self.full_attention = full_attention
        self.norm1 = RMSNorm(cfg.vision_hidden_size, VISION_NORM_EPS)
        self.norm2 = RMSNorm(cfg.vision_hidden_size, VISION_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        window_gather: torch.Tensor,
        window_valid: torch.Tensor,
        window_unpad: torch.Tensor,
    ) -> torch.Tensor:
        if self.full_attention:
            x = x + self.attn(self.norm1(x), cos, sin, None, None, None)
        else:
            x = x + self.attn(self.norm1(x), cos, sin, window_gather, window_valid, window_unpad)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: RexOmniConfig) -> None:
        super().__init__()
        self.merged_dim = cfg.vision_hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.vision_hidden_size, VISION_NORM_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            nn.Linear(self.merged_dim, cfg.vision_out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))


class VisionEncoder(nn.Module):
    """Pixel-patch rows of one image -> image embeddings [N/4, hidden_size] in raster order."""

    def __init__(self, cfg: RexOmniConfig) -> None:
        super().__init__()
        self.head_dim = cfg.vision_head_dim
        self.rope_theta = cfg.vision_rope_theta
        full = set(cfg.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg, i in full) for i in range(cfg.vision_depth)])
        self.merger = PatchMerger(cfg)

    def forward(
        self,
        pixel_patches: torch.Tensor,
        rotary_pos: torch.Tensor,
        patch_order: torch.Tensor,
        reverse_index: torch.Tensor,
        window_gather: torch.Tensor,
        window_valid: torch.Tensor,
        window_unpad: torch.Tensor,
    ) -> torch.Tensor:
        # Work in window order throughout: windows are then contiguous runs of rows, and
        # each merge block stays four consecutive rows for the merger.
        x = self.patch_embed(pixel_patches)[patch_order]
        cos, sin = vision_rotary(rotary_pos[patch_order], self.head_dim, self.rope_theta)
        for block in self.blocks:
            x = block(x, cos, sin, window_gather, window_valid, window_unpad)
        return self.merger(x)[reverse_index]


# --------------------------------------------------------------------------- text


def mrope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: Sequence[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, head_dim] from the (t, h, w) streams [3, B, T]; frequency section i uses stream i % 3."""
    inv_freq = inverse_frequencies(head_dim, theta, position_ids.device)
    angles = position_ids[..., None].float() * inv_freq
    angles = torch.cat([part[i % 3] for i, part in enumerate(angles.split(list(mrope_section), dim=-1))], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class DecoderOps:
    """The operations a decoder layer delegates: the attention context, the rotary tables, the
    attention with its cache append, and each residual add with the norm after it. This is the
    plain-torch (SDPA) set, traced into no graph and run by the CPU and prefill paths; a backend
    passes another set to :meth:`RexOmniModel.decode` (the CUDA backend: its Triton kernels), so
    the layers themselves are written once."""

    def attention_context(self, cache_position: torch.Tensor, kv_length: int) -> torch.Tensor:
        """What every layer's attention needs besides q/k/v: here the mask [T, kv_length] that
        lets the token at slot ``p`` see slots ``0..p``."""
        slots = torch.arange(kv_length, device=cache_position.device)
        return slots[None, :] <= cache_position[:, None]

    def rotary(self, position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: Sequence[int],
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope_cos_sin(position_ids, head_dim, theta, mrope_section, dtype)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  key_cache: torch.Tensor, value_cache: torch.Tensor, cache_position: torch.Tensor,
                  context: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, D], k / v [B, T, KVH, D] before rotary; cos / sin [B, T, D]; the caches
        [B, KVH, S_max, D] get the new keys and values at ``cache_position``. Returns [B, T, H, D]."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        cos, sin = cos[:, None], sin[:, None]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        key_cache.index_copy_(2, cache_position, k.to(key_cache.dtype))
        value_cache.index_copy_(2, cache_position, v.to(value_cache.dtype))
        kv_length = context.shape[-1]
        keys, values = key_cache[:, :, :kv_length].to(q.dtype), value_cache[:, :, :kv_length].to(q.dtype)
        # grouped-query attention of the new queries over the cached keys
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=context, enable_gqa=True)
        return out.transpose(1, 2)

    def residual_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: "RMSNorm",
                      out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)); ``out`` is the previous normed state, no longer read, that
        a set may write the new one into."""
        x = x if delta is None else x + delta
        return x, norm(x)


TORCH_OPS = DecoderOps()


class TextAttention(nn.Module):
    def __init__(self, cfg: RexOmniConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        cache_position: torch.Tensor,
        context: torch.Tensor,
        ops: DecoderOps = TORCH_OPS,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        out = ops.attention(q, k, v, cos, sin, key_cache, value_cache, cache_position, context)
        return self.o_proj(out.reshape(batch, length, -1))


class TextMLP(nn.Module):
    def __init__(self, cfg: RexOmniConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: RexOmniConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = TextAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = TextMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        cache_position: torch.Tensor,
        context: torch.Tensor,
        next_norm: RMSNorm,
        ops: DecoderOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, its ``input_layernorm``) -> (residual stream, ``next_norm`` of it): the
        norm after the MLP's residual add is the next layer's (or the final one), so a set of ops
        can fuse each add with the norm that follows it."""
        attn = self.self_attn(h, cos, sin, key_cache, value_cache, cache_position, context, ops)
        x, h = ops.residual_norm(x, attn, self.post_attention_layernorm, h)
        return ops.residual_norm(x, self.mlp(h), next_norm, h)


class TextModel(nn.Module):
    """The decoder: input embeddings -> final-normed hidden states, reading and writing the KV cache."""

    def __init__(self, cfg: RexOmniConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.mrope_section = tuple(cfg.mrope_section)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        key_cache: Sequence[torch.Tensor],
        value_cache: Sequence[torch.Tensor],
        cache_position: torch.Tensor | None,
        kv_length: int | None = None,
        ops: DecoderOps = TORCH_OPS,
    ) -> torch.Tensor:
        """inputs_embeds [B, T, H]; position_ids [3, B, T] int64; per-layer caches
        [B, KVH, S_max, D]; cache_position [T] int64 (the slots the T new tokens take; None
        where ``ops`` places them itself).
        ``kv_length`` (a static size, >= last cache position + 1) trims attention to the
        filled prefix; by default it spans the whole buffer."""
        kv_length = key_cache[0].shape[2] if kv_length is None else kv_length
        context = ops.attention_context(cache_position, kv_length)
        cos, sin = ops.rotary(position_ids, self.head_dim, self.rope_theta, self.mrope_section, inputs_embeds.dtype)
        norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        x, h = ops.residual_norm(inputs_embeds, None, self.layers[0].input_layernorm, None)
        for layer, k_cache, v_cache, next_norm in zip(self.layers, key_cache, value_cache, norms):
            x, h = layer(x, h, cos, sin, k_cache, v_cache, cache_position, context, next_norm, ops)
        return h


@dataclass
class KVCache:
    """Per-layer key and value buffers [B, KVH, max_length, D]; the model writes them in place."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(
        cls,
        cfg: RexOmniConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> "KVCache":
        if batch_size <= 0 or max_length <= 0:
            raise ModelInputError(f"KV cache needs batch_size > 0 and max_length > 0, got {batch_size}, {max_length}")
        shape = (batch_size, cfg.num_key_value_heads, max_length, cfg.head_dim)
        # Zeros, not empty: unfilled slots are masked, and a masked NaN would still poison the sum.
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)],
        )

    @property
    def max_length(self) -> int:
        return int(self.keys[0].shape[2])

    def slots(self, first: int, count: int) -> "KVCache":
        """Rows first..first+count-1 of every buffer, as views (written in place through them): one
        sequence's slot of a batched cache, or the first rows a batched step runs on."""
        return KVCache([k[first:first + count] for k in self.keys], [v[first:first + count] for v in self.values])

    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Row ``target`` gets row ``source``'s first ``length`` cached tokens (branches sharing a prefill)."""
        for buffer in self.keys + self.values:
            buffer[target, :, :length] = buffer[source, :, :length]


# --------------------------------------------------------------------------- whole model


class RexOmniModel(nn.Module):
    """``.visual`` (vision encoder) and ``.model`` (decoder), plus ``.lm_head`` when untied."""

    def __init__(self, cfg: RexOmniConfig) -> None:
        super().__init__()
        self.config = cfg
        self.image_token_id = cfg.image_token_id
        self.visual = VisionEncoder(cfg)
        self.model = TextModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def head_weight(self) -> torch.Tensor:
        """[vocab, hidden]: the output projection (the input embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def encode_image(self, pixel_patches: torch.Tensor, layout: VisionLayout | VisionIndices) -> torch.Tensor:
        """Pixel-patch rows [N, patch_dim] of one image -> image embeddings [N/4, hidden]."""
        indices = VisionIndices.from_layout(layout, pixel_patches.device) if isinstance(layout, VisionLayout) else layout
        expected = (indices.rotary_pos.shape[0], self.config.patch_dim)
        if tuple(pixel_patches.shape) != expected:
            raise ModelInputError(f"pixel_patches has shape {tuple(pixel_patches.shape)}, the layout expects {expected}")
        return self.visual(pixel_patches, *indices)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        cache_position: torch.Tensor | None,
        kv_length: int | None = None,
        ops: DecoderOps = TORCH_OPS,
    ) -> torch.Tensor:
        return self.model(inputs_embeds, position_ids, cache.keys, cache.values, cache_position, kv_length, ops)

    def logits(self, hidden: torch.Tensor, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., H] -> logits over all ids, or only over ``rows`` (a slice of ids or an id tensor)."""
        weight = self.head_weight
        if isinstance(rows, slice):
            weight = weight[rows]
        elif rows is not None:
            weight = weight.index_select(0, rows)
        return F.linear(hidden, weight)

    def prefill(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        image_embeds: torch.Tensor | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Run ``input_ids`` [B, T] into the cache from slot ``start``; image embeddings (all
        images of the batch, in order) replace the image-token positions. Returns [B, T, H]."""
        batch, length = input_ids.shape
        if position_ids.shape != (3, batch, length):
            raise ModelInputError(f"position_ids has shape {tuple(position_ids.shape)}, expected (3, {batch}, {length})")
        if start < 0 or start + length > cache.max_length:
            raise ModelInputError(
                f"{length} tokens from slot {start} do not fit a KV cache of max_length {cache.max_length}"
            )
        embeds = self.embed(input_ids)
        image_mask = input_ids == self.image_token_id
        num_image_tokens = int(image_mask.sum())
        provided = 0 if image_embeds is None else image_embeds.shape[0]
        if num_image_tokens != provided:
            raise ModelInputError(
                f"input_ids hold {num_image_tokens} image tokens (id {self.image_token_id}) "
                f"but {provided} image embeddings were given"
            )
        if image_embeds is not None:
            embeds = embeds.masked_scatter(image_mask[..., None], image_embeds.to(embeds.dtype))
        cache_position = torch.arange(start, start + length, device=input_ids.device)
        return self.decode(embeds, position_ids, cache, cache_position, kv_length=start + length)
