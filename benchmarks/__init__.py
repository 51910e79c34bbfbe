"""Benchmarks for pypool: `python -m benchmarks.run` (see README.md)."""
