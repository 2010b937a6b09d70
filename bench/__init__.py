"""Benchmarks (pytest-benchmark), the throughput guard and the performance page; see bench/README.md."""
