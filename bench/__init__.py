"""Benchmarks: the ``rexedge bench`` harness (scenarios, forced answers, baselines, reports) and micro-benchmarks.

See bench/README.md for the commands, the metrics and the JSON schema."""
