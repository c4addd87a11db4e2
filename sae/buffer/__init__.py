"""Activation storage and sources: shard writer/manifest, shuffled reader, live stream, synthetic data."""

from .source import ActivationSource, Batch

__all__ = ["ActivationSource", "Batch"]
