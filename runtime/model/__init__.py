"""The compact torch model of Rex-Omni (Qwen2.5-VL) and checkpoint loading, for the torch backends."""
