"""Where the demo's files live: a sample image and the embedded default bundle.

Both are package data under runtime/assets/, made by ``python -m rexedge.export.fixtures.demo_assets``
(a synthetic scene drawn with Pillow, and a bundle exported from a tiny random checkpoint).
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_IMAGE = ASSETS / "sample.png"
DEMO_BUNDLE = ASSETS / "demo_bundle"
DEMO_CATEGORIES = "cup, door handle"
