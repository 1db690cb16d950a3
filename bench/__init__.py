"""Benchmark harness, baselines and scenarios (arrives with the benchmarks issue)."""
