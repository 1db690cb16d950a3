"""Calibration sets and INT8 quantization (arrives with the TensorRT issue)."""
