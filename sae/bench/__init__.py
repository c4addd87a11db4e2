"""Benchmarks users can run on their own hardware (``python -m sae.bench.<name>``). Not tests."""
