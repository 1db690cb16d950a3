"""rexedge.runtime: tokenizer, prompts, preprocessing, output grammar, decode loop, backends, API.

``RexOmni`` and ``parse_prediction`` are loaded on first use: importing this package
(which every rexedge module does, for its errors) stays free of numpy, onnxruntime and torch.
"""

from typing import Any

__all__ = ["RexOmni", "parse_prediction"]


def __getattr__(name: str) -> Any:
    if name == "RexOmni":
        from rexedge.runtime.api import RexOmni

        return RexOmni
    if name == "parse_prediction":
        from rexedge.runtime.results.parse import parse_prediction

        return parse_prediction
    raise AttributeError(f"module 'rexedge.runtime' has no attribute {name!r}")
