"""The Triton kernels compile for the GPUs rexedge targets, without a GPU.

The interpreter (what the other kernel tests run on a CPU) executes the kernels as numpy
and never runs Triton's compiler, so it misses what only compilation checks: types that
change across loop iterations, block shapes ``tl.dot`` or ``tl.arange`` refuse, scalar /
tensor mix-ups, shared memory over the limit. Here each launcher is called with the 3B
model's shapes on meta tensors; its launches are recorded instead of run, and every
distinct specialisation is compiled ahead of time to a cubin (Triton's bundled ptxas) for
sm_90 (H100 / H200) and sm_87 (Jetson Orin), in a subprocess with TRITON_INTERPRET=0
(under the interpreter, ``triton.jit`` makes interpreter objects that do not compile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from triton.runtime.jit import JITFunction  # noqa: E402

from rexedge.kernels import decode_attention as attention_module  # noqa: E402
from rexedge.kernels import restricted_head as head_module  # noqa: E402
from rexedge.kernels import rmsnorm as rmsnorm_module  # noqa: E402
from rexedge.kernels.decode_attention import decode_attention  # noqa: E402
from rexedge.kernels.restricted_head import restricted_head  # noqa: E402
from rexedge.kernels.rmsnorm import add_rms_norm  # noqa: E402

TARGETS = {"sm_90": 90, "sm_87": 87}   # compute capability
# shared memory one block may use (opt-in maximum: the SM's shared memory less 1 KB; Orin's deviceQuery reports
# 167,936 bytes per SM, Hopper has 228 KB): checked at load time on the device, so a kernel over it compiles here
# and fails only on a GPU (Triton's OutOfResources)
SHARED_LIMITS = {90: 227 * 1024, 87: 163 * 1024}
LAUNCH_OPTIONS = ("num_warps", "num_stages")   # launch keywords that are compile options, not kernel arguments
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
                 torch.int32: "*i32", torch.uint8: "*u8"}
HIDDEN, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 2048, 151_936, 16, 2, 128   # rex-omni-3b


# Run with TRITON_INTERPRET=0: reads [{"module", "kernel", "signature", "constexprs", "options"}], a capability and
# its shared-memory limit, compiles each to a cubin, prints one line per kernel; a compilation error or shared
# memory over the limit fails the process.
COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
specs, capability, shared_limit = json.loads(sys.stdin.read()), int(sys.argv[1]), int(sys.argv[2])
for spec in specs:
    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    compiled = triton.compile(ASTSource(kernel, spec["signature"], spec["constexprs"]),
                              target=GPUTarget("cuda", capability, 32), options=spec["options"])
    assert compiled.asm["cubin"], spec
    assert compiled.metadata.shared <= shared_limit, (compiled.metadata.shared, shared_limit, spec)
    print(spec["kernel"], "sm_%d" % capability, len(compiled.asm["cubin"]), "bytes of cubin,",
          compiled.metadata.shared, "bytes of shared memory")
"""


class Launches:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, module: Any, name: str) -> None:
        self.module, self.name = module.__name__, name
        self.fn = getattr(module, name).fn   # the Python function (the interpreter's wrapper keeps it as .fn)
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


def specialisations(launches: Launches) -> list[dict]:
    """One spec per distinct (signature, constexprs) among the recorded calls."""
    fn = JITFunction(launches.fn)   # for its parameter list only
    specs = []
    for args, kwargs in launches.calls:
        options = {name: kwargs[name] for name in LAUNCH_OPTIONS if name in kwargs}
        values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in options}
        assert set(values) == set(fn.arg_names), f"launch of {fn.__name__} misses {set(fn.arg_names) - set(values)}"
        signature, constexprs = {}, {}
        for param in fn.params:
            if param.is_constexpr:
                signature[param.name], constexprs[param.name] = "constexpr", values[param.name]
            else:
                signature[param.name] = _type(values[param.name])
        spec = {"module": launches.module, "kernel": launches.name, "signature": signature, "constexprs": constexprs,
                "options": options}
        if spec not in specs:
            specs.append(spec)
    return specs


def record(module: Any, names: tuple[str, ...], launch: Callable[[], None],
           monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    recorders = {name: Launches(module, name) for name in names}
    for name, recorder in recorders.items():
        monkeypatch.setattr(module, name, recorder)
    launch()
    specs = []
    for name, recorder in recorders.items():
        assert recorder.calls, f"{name} was never launched"
        specs += specialisations(recorder)
    return specs


def compile_all(specs: list[dict], capability: int) -> None:
    done = subprocess.run([sys.executable, "-c", COMPILE, str(capability), str(SHARED_LIMITS[capability])],
                          input=json.dumps(specs), text=True,
                          capture_output=True, env=os.environ | {"TRITON_INTERPRET": "0"}, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(done.stdout.splitlines()) == len(specs), done.stdout


def _meta(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _head_launches() -> None:
    """Every mode the decode loop and the CUDA backend use: full vocabulary (phrase steps: with blocked rows),
    coordinates + extras, a few ids; greedy and sampled."""
    coord_start = 150_643   # <0>
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        table, hidden = _meta(VOCAB, HIDDEN, dtype=dtype), _meta(1, HIDDEN, dtype=dtype)
        seen = _meta(1, VOCAB, dtype=torch.uint8)
        ids = _meta(3, dtype=torch.int64)
        restricted_head(hidden, table, seen, 0, VOCAB)
        restricted_head(hidden, table, seen, 0, VOCAB, blocked=_meta(1, VOCAB, dtype=torch.uint8))
        restricted_head(hidden, table, seen, coord_start, coord_start + 1000, ids, penalty=1.05)
        restricted_head(hidden, table, seen, 0, 0, ids)
    table, hidden = _meta(VOCAB, HIDDEN), _meta(2, HIDDEN)
    seen = _meta(2, VOCAB, dtype=torch.bool)
    noise, logits = _meta(2, 1000, dtype=torch.float32), _meta(2, 1000, dtype=torch.float32)
    restricted_head(hidden, table, seen, coord_start, coord_start + 1000, temperature=0.7, noise=noise,
                    logits_out=logits)


def _attention_launches() -> None:
    """One new token and a jump-forward append, over a 4,096-slot cache, in each cache dtype."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for tokens in (1, 5):
            q = _meta(1, tokens, HEADS, HEAD_DIM, dtype=dtype)
            k, v = (_meta(1, tokens, KV_HEADS, HEAD_DIM, dtype=dtype) for _ in range(2))
            cos, sin = (_meta(1, tokens, HEAD_DIM, dtype=torch.float32) for _ in range(2))
            k_cache, v_cache = (_meta(1, KV_HEADS, 4096, HEAD_DIM, dtype=dtype) for _ in range(2))
            decode_attention(q, k, v, cos, sin, k_cache, v_cache, _meta(1, dtype=torch.int32))


def _rmsnorm_launches() -> None:
    """The first norm of a step (no residual add) and the fused ones, for 1 and 5 new tokens (small enough
    for real tensors: the launcher compares storage addresses, which meta tensors do not have)."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for tokens in (1, 5):
            x, delta = (torch.empty(tokens, HIDDEN, dtype=dtype) for _ in range(2))
            weight = torch.empty(HIDDEN, dtype=dtype)
            add_rms_norm(x, None, weight, 1e-6)
            add_rms_norm(x, delta, weight, 1e-6)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_rmsnorm_compiles(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compile_all(record(rmsnorm_module, ("_add_rms_norm_kernel",), _rmsnorm_launches, monkeypatch), TARGETS[target])


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_restricted_head_compiles(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = record(head_module, ("_head_partials_kernel", "_head_reduce_kernel"), _head_launches, monkeypatch)
    compile_all(specs, TARGETS[target])


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_decode_attention_compiles(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = record(attention_module, ("_rotary_append_kernel", "_split_attention_kernel", "_combine_kernel"),
                   _attention_launches, monkeypatch)
    compile_all(specs, TARGETS[target])
