"""Benchmarks: `python -m bench.latency` (end-to-end batch-1 latency), `python bench/kernels.py` (Triton kernels)."""
