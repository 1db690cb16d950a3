import os


def _cuda_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Triton kernels run on a CPU only through the interpreter, which must be chosen before any
# kernel is defined; with a GPU they are compiled and run there (the kernel tests follow).
if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Python interpreters the tests start (`python -c`, `python -m rexedge.runtime.cli`) must not
# put their working directory (often the repository root) on sys.path either: our folders
# `kernels/`, `export/`, ... would shadow installed packages of those names
# (tests/test_no_shadowing.py).
os.environ["PYTHONSAFEPATH"] = "1"

# bundle hashes remembered by the tests' loads (rexedge.runtime.hash_cache) stay out of the user's cache
import tempfile  # noqa: E402

os.environ.setdefault("REXEDGE_CACHE_DIR", tempfile.mkdtemp(prefix="rexedge-test-cache-"))

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint in the published layout (sharded safetensors, flat config, vocab.json + merges.txt)."""
    from rexedge.export.fixtures.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint", preset="tiny", seed=0)


LONG_RUNS = {"long_fuzz": "the long fuzz run (tests/test_fuzz.py, tens of thousands of streams)"}


def pytest_configure(config: pytest.Config) -> None:
    for name, what in LONG_RUNS.items():
        config.addinivalue_line("markers", f"{name}: {what}; skipped unless selected with -m {name}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # a long run is skipped unless the -m expression names it
    selected = config.getoption("markexpr") or ""
    for item in items:
        for name in LONG_RUNS:
            if name in item.keywords and name not in selected:
                item.add_marker(pytest.mark.skip(reason=f"long run: select it with -m {name}"))
