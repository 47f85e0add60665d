"""Benchmarks of the hot paths (`python -m benchmarks.run`, `make bench`)."""
