"""Triton kernels, each beside its torch reference (arrives with the kernels issue)."""
