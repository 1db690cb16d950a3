"""TensorRT: optimization profiles, the operator check, engine building."""
