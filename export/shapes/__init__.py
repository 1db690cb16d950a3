"""The shapes model: generated scenes of coloured shapes, its training and its accuracy (docs/shapes_model.md)."""
