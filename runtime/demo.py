"""Where the demo's files live: a sample image and the embedded default bundle.

Both are package data under runtime/assets/, made by ``python -m rexedge.export.fixtures.demo_assets``:
a generated scene of shapes and the small model of Rex-Omni's architecture trained on such scenes
(``rexedge.export.shapes.train``; docs/shapes_model.md).
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_IMAGE = ASSETS / "sample.png"
DEMO_BUNDLE = ASSETS / "demo_bundle"
DEMO_SCENE_SEED = 2**42 + 111  # the sample's seed in rexedge.export.shapes.scenes (outside training and evaluation)
DEMO_CATEGORIES = "green square, yellow square, yellow circle, blue square"  # its three shapes and one absent
DEMO_MODEL = ("a small model of Rex-Omni's architecture trained on generated shapes, to show the pipeline; "
              "export the real checkpoint (rexedge export) for real images")
