import os

# Triton kernels run on the CPU only through the interpreter, which must be chosen
# before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint in the published layout (sharded safetensors, flat config, vocab.json + merges.txt)."""
    from rexedge.export.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint", preset="tiny", seed=0)
