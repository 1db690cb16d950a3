"""Decode attention kernel == its torch reference; the reference == the compact model's attention.

Runs under TRITON_INTERPRET=1 on the CPU (conftest) and natively when CUDA is present.
Fresh random inputs per case, odd sizes; the output is poisoned with NaN, and so are the
cache slots past the live context (the kernel must neither read nor leave them).
"""

from __future__ import annotations

import zlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from rexedge.runtime.config import RexOmniConfig  # noqa: E402
from rexedge.runtime.model.compact import TextAttention, mrope_cos_sin  # noqa: E402
from rexedge.kernels import KernelInputError  # noqa: E402
from rexedge.kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402

# compiled on a GPU, under the interpreter on a CPU (conftest): one or the other per process
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


def _case(seed, batch, tokens, heads, kv_heads, dim, s_max, past, dtype, device):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    q, k, v = rand(batch, tokens, heads, dim), rand(batch, tokens, kv_heads, dim), rand(batch, tokens, kv_heads, dim)
    angles = torch.rand(batch, tokens, dim // 2, generator=g) * 50
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    k_cache, v_cache = rand(batch, kv_heads, s_max, dim), rand(batch, kv_heads, s_max, dim)
    for b, p in enumerate(past):  # nothing past the live context may be read
        k_cache[b, :, p + tokens:] = float("nan")
        v_cache[b, :, p + tokens:] = float("nan")
    cache_len = torch.tensor(past, dtype=torch.int32, device=device)
    return q, k, v, cos, sin, k_cache, v_cache, cache_len


# (batch, new tokens, heads, kv heads, head_dim, S_max, cached tokens per row, dtype)
CASES = [
    (1, 1, 4, 2, 16, 8, [0], torch.float32),               # context 1
    (2, 1, 6, 2, 24, 80, [36, 11], torch.float32),         # context 37, odd head_dim, per-row lengths
    (1, 3, 4, 2, 16, 77, [34], torch.float16),             # jump-forward append of 3, context 37
    (1, 3, 4, 2, 16, 70, [63], torch.float32),             # a chunk where the first new token sees nothing
    (1, 1, 16, 2, 128, 64, [36], torch.float16),           # the real head shape, group 8
    (1, 1, 4, 1, 16, 4200, [1499], torch.float32),         # context 1,500; chunks of two tiles (S_max > 4,096)
    (1, 9, 16, 2, 16, 64, [20], torch.float32),            # 72 query rows of a KV head: two row blocks
    (1, 2, 4, 2, 16, 1500, [1498], torch.float16),         # context 1,500 exactly filling S_max
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,tokens,heads,kv_heads,dim,s_max,past,dtype", CASES)
def test_kernel_matches_reference(device, batch, tokens, heads, kv_heads, dim, s_max, past, dtype):
    seed = zlib.crc32(repr((batch, tokens, heads, kv_heads, dim, s_max, past, dtype)).encode())
    q, k, v, cos, sin, k_cache, v_cache, cache_len = _case(seed, batch, tokens, heads, kv_heads, dim, s_max, past,
                                                           dtype, device)
    k_ref, v_ref = k_cache.clone().cpu(), v_cache.clone().cpu()
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k, v, cos, sin, k_cache, v_cache, cache_len, out=out)
    ref = decode_attention_reference(q.cpu(), k.cpu(), v.cpu(), cos.cpu(), sin.cpu(), k_ref, v_ref, cache_len.cpu())
    assert torch.isfinite(out).all()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(out.cpu().float(), ref.float(), **tol)
    # the new rotated k and v landed in their slots; every other slot is untouched (NaN stays NaN)
    torch.testing.assert_close(k_cache.cpu(), k_ref, equal_nan=True, rtol=2e-3 if dtype == torch.float16 else 1e-6, atol=1e-5)
    torch.testing.assert_close(v_cache.cpu(), v_ref, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_consecutive_steps_with_a_fixed_grid(device):
    """One grid (context_bound) for every step, the length read from the device: as in a replayed graph."""
    q, k, v, cos, sin, k_cache, v_cache, cache_len = _case(7, 1, 1, 4, 2, 16, 200, [60], torch.float32, device)
    k_cache[:, :, 60:] = 0.0
    v_cache[:, :, 60:] = 0.0
    k_ref, v_ref = k_cache.clone().cpu(), v_cache.clone().cpu()
    g = torch.Generator().manual_seed(8)
    for tokens in (1, 3, 1, 2):
        q, k, v = (torch.randn(1, tokens, h, 16, generator=g).to(device) for h in (4, 2, 2))
        angles = torch.rand(1, tokens, 8, generator=g).repeat(1, 1, 2) * 30
        cos, sin = angles.cos().to(device), angles.sin().to(device)
        out = torch.full_like(q, float("nan"))
        decode_attention(q, k, v, cos, sin, k_cache, v_cache, cache_len, out=out, context_bound=200)
        ref = decode_attention_reference(q.cpu(), k.cpu(), v.cpu(), cos.cpu(), sin.cpu(), k_ref, v_ref, cache_len.cpu())
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
        cache_len += tokens
    torch.testing.assert_close(k_cache.cpu(), k_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 4])
def test_reference_matches_compact_model_attention(tokens):
    """The reference (on q/k/v projections) + o_proj == the compact model's TextAttention over a filled cache."""
    cfg = RexOmniConfig.preset("tiny")
    torch.manual_seed(tokens)
    attn = TextAttention(cfg).eval()
    past, s_max, hd = 29, 48, cfg.head_dim
    shape = (1, cfg.num_key_value_heads, s_max, hd)
    k_model, v_model = torch.randn(shape), torch.randn(shape)
    k_ref, v_ref = k_model.clone(), v_model.clone()
    x = torch.randn(1, tokens, cfg.hidden_size)
    positions = torch.stack([torch.arange(tokens) + 40, torch.arange(tokens) + 3, torch.arange(tokens) + 17])[:, None]
    cos, sin = mrope_cos_sin(positions, hd, cfg.rope_theta, cfg.mrope_section, torch.float32)
    cache_position = torch.arange(past, past + tokens)
    allowed = torch.arange(past + tokens)[None, :] <= cache_position[:, None]
    with torch.no_grad():
        expected = attn(x, cos, sin, k_model, v_model, cache_position, allowed)
        q = attn.q_proj(x).view(1, tokens, cfg.num_attention_heads, hd)
        k = attn.k_proj(x).view(1, tokens, cfg.num_key_value_heads, hd)
        v = attn.v_proj(x).view(1, tokens, cfg.num_key_value_heads, hd)
        out = decode_attention_reference(q, k, v, cos, sin, k_ref, v_ref, torch.tensor([past], dtype=torch.int32))
        got = attn.o_proj(out.reshape(1, tokens, -1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_ref, k_model, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_ref, v_model)


def test_launcher_rejects_bad_inputs():
    q, k, v, cos, sin, k_cache, v_cache, cache_len = _case(1, 1, 1, 4, 2, 16, 32, [3], torch.float32, "cpu")
    with pytest.raises(KernelInputError, match="multiple of KV heads"):
        decode_attention(q[:, :, :3], k, v, cos, sin, k_cache, v_cache, cache_len)
    with pytest.raises(KernelInputError, match="cache_len must be"):
        decode_attention(q, k, v, cos, sin, k_cache, v_cache, cache_len.long())
    with pytest.raises(KernelInputError, match="cos and sin"):
        decode_attention(q, k, v, cos[..., :8], sin, k_cache, v_cache, cache_len)
    with pytest.raises(KernelInputError, match="context_bound"):
        decode_attention(q, k, v, cos, sin, k_cache, v_cache, cache_len, context_bound=33)
    with pytest.raises(KernelInputError, match="k and v must be"):
        decode_attention(q, k[:, :, :1], v, cos, sin, k_cache, v_cache, cache_len)
