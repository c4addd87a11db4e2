"""Where training activations come from: synthetic toy data, a harvested buffer, or a live harvest."""

from __future__ import annotations

from dataclasses import dataclass, field

from .synthetic import SyntheticConfig


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | buffer | live
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
