"""Residual add + RMSNorm kernel == the compact model's add and RMSNorm.

Runs under TRITON_INTERPRET=1 on the CPU (conftest) and natively when CUDA is present
(bf16 there only: the interpreter's bf16 arithmetic is wrong). Fresh random inputs, odd
sizes, outputs poisoned before every launch.
"""

from __future__ import annotations

import zlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from rexedge.kernels import KernelInputError  # noqa: E402
from rexedge.kernels.rmsnorm import add_rms_norm, add_rms_norm_reference  # noqa: E402

CUDA = torch.cuda.is_available()
# compiled on a GPU, under the interpreter on a CPU (conftest): one or the other per process
DEVICES = ["cuda"] if CUDA else ["cpu"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 2048), (5, 96), (3, 1000), (1, 7)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_kernel_matches_the_model(device: str, dtype: torch.dtype, rows: int, hidden: int, with_delta: bool) -> None:
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, rows, hidden, with_delta)).encode()))
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    delta = torch.randn(rows, hidden, generator=g).to(dtype) if with_delta else None
    weight = (1 + torch.randn(hidden, generator=g) * 0.2).to(dtype)
    eps = float(torch.rand(1, generator=g)) * 1e-5 + 1e-6
    expected_x = x.clone()
    expected = add_rms_norm_reference(expected_x, delta, weight, eps)

    x = x.to(device)
    out = torch.full((rows, hidden), float("nan"), dtype=dtype, device=device)
    add_rms_norm(x, None if delta is None else delta.to(device), weight.to(device), eps, out=out)
    ulp = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]   # about one unit in the last place
    tolerance = {"rtol": ulp, "atol": ulp}
    torch.testing.assert_close(x.cpu(), expected_x, rtol=0, atol=0)           # the same rounded sum
    torch.testing.assert_close(out.cpu(), expected, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_a_fresh_output(device: str) -> None:
    """Rows of a wider buffer (a slice of a packed batch), out allocated by the launcher."""
    g = torch.Generator().manual_seed(3)
    buffer = torch.randn(4, 160, generator=g)
    delta = torch.randn(8, 96, generator=g)[::2]
    weight = torch.randn(96, generator=g)
    expected_x = buffer[:, 20:116].clone()
    expected = add_rms_norm_reference(expected_x, delta, weight, 1e-6)
    buffer = buffer.to(device)
    out = add_rms_norm(buffer[:, 20:116], delta.to(device), weight.to(device), 1e-6)
    torch.testing.assert_close(buffer[:, 20:116].cpu(), expected_x, rtol=0, atol=0)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_launcher_rejects_bad_inputs() -> None:
    x, w = torch.randn(2, 32), torch.randn(32)
    with pytest.raises(KernelInputError, match="x must be"):
        add_rms_norm(x.T, None, torch.randn(2), 1e-6)
    with pytest.raises(KernelInputError, match="weight must be"):
        add_rms_norm(x, None, w.half(), 1e-6)
    with pytest.raises(KernelInputError, match="delta must be"):
        add_rms_norm(x, torch.randn(2, 31), w, 1e-6)
    with pytest.raises(KernelInputError, match="alias"):
        add_rms_norm(x, None, w, 1e-6, out=x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 96), (3, 1000)])
def test_reference_matches_the_compact_model(dtype: torch.dtype, rows: int, hidden: int) -> None:
    """The kernels' own reference == the compact model's residual add + RMSNorm, to the last bit."""
    from rexedge.runtime.model.compact import RMSNorm

    g = torch.Generator().manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    delta = torch.randn(rows, hidden, generator=g).to(dtype)
    norm = RMSNorm(hidden, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(hidden, generator=g) * 0.2)
        expected = norm(x + delta)
    got_x = x.clone()
    got = add_rms_norm_reference(got_x, delta, norm.weight.detach(), 1e-6)
    assert torch.equal(got, expected)
    assert torch.equal(got_x, x + delta)
