"""The layers hold: an import graph of the source tree (ast only, nothing imported) against the rules.

- runtime is the base: it imports only itself and the kernels (the torch CUDA backend runs them);
  the CLI's parser (runtime/cli/__init__.py) knows every package (it is the one place that does).
- kernels stand alone: they import nothing of rexedge but themselves.
- export builds artifacts and may import runtime and kernels; calib and bench may import runtime,
  export and kernels; bench may also import calib (it measures calibrated bundles).
- backends do not import each other: what two share has a module of its own
  (base, device_head, cuda_memory, trt_engines, ...).
Every edge counts: imports inside functions and under TYPE_CHECKING too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "kernels", "export", "calib", "bench")
ALLOWED = {
    "runtime": {"runtime", "kernels"},
    "kernels": {"kernels"},
    "export": {"export", "runtime", "kernels"},
    "calib": {"calib", "runtime", "export", "kernels"},
    "bench": {"bench", "runtime", "export", "kernels", "calib"},
}
KNOWS_ALL = {"runtime/cli/__init__.py"}
BACKENDS = ("ort", "torch_cpu", "torch_cuda", "trt")


def rexedge_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``rexedge.*`` import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from rexedge.runtime import backends` imports a module too
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.startswith("rexedge.")]


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py") if ".venv" not in p.parts)


def violations(files: list[Path], root: Path = REPO) -> list[str]:
    bad = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        package = rel.split("/")[0]
        backend = path.stem if rel.startswith("runtime/backends/") and path.stem in BACKENDS else None
        for line, name in rexedge_imports(path):
            target = name.split(".")[1]
            if target not in PACKAGES:
                continue
            if rel not in KNOWS_ALL and target not in ALLOWED[package]:
                bad.append(f"{rel}:{line} imports rexedge.{target} ({package} may import {sorted(ALLOWED[package])})")
            other = name.split(".")[3] if name.startswith("rexedge.runtime.backends.") else None
            if backend and other in BACKENDS and other != backend:
                bad.append(f"{rel}:{line} imports the {other} backend (backends do not import each other)")
    return list(dict.fromkeys(bad))   # `from a.b import c` is one edge, reported once


def test_the_source_tree_keeps_its_layers():
    files = source_files()
    assert len(files) > 50, f"found only {len(files)} source files under {REPO}"
    bad = violations(files)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("package,line,expected", [
    ("runtime/request", "from rexedge.export.bundle import export_bundle", "runtime may import"),
    ("kernels", "from rexedge.runtime.errors import RexEdgeError", "kernels may import"),
    ("export", "import rexedge.calib.quantize", "export may import"),
    ("calib", "from rexedge.bench import harness", "calib may import"),
    ("runtime/backends", "from rexedge.runtime.backends.torch_cuda import DeviceHead", "each other"),
])
def test_the_check_finds_a_violation(tmp_path: Path, package: str, line: str, expected: str):
    """Each rule catches the edge it forbids (a made-up file in a made-up tree)."""
    name = "trt.py" if package == "runtime/backends" else "made_up.py"
    path = tmp_path / package / name
    path.parent.mkdir(parents=True)
    path.write_text(f"def f():\n    if True:\n        {line}\n")   # nested: function-level imports count
    found = violations([path], root=tmp_path)
    assert len(found) == 1 and expected in found[0], found
