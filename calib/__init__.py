"""INT8 for bundles: calibration sets (dataset), explicit Q/DQ quantization (quantize), INT8 vs FP32 agreement (quality)."""
