"""rexedge.export: model definition, checkpoint loading, tiny checkpoints, ONNX export."""
