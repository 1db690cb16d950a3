"""ONNX graphs of the vision encoder and the decoder, built from checkpoint tensors."""
