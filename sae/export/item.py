"""One SAE to export and its provenance, as every format writer and reader hands it on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae.models import SparseCoder


@dataclass
class ExportItem:
    """One SAE to export, with its provenance."""

    name: str
    """The SAE's name in its run (``topk``, a variant name) or its folder name."""
    sae: SparseCoder
    meta: dict[str, Any] = field(default_factory=dict)
    """Its cfg.json as training wrote it (data section, normalisation); {} when imported."""
    hookpoint: str = ""
    """Input hook point ("" when unknown, e.g. synthetic data)."""
    target_hookpoint: str = ""
    model_name: str = ""
    tokens: int | None = None
    steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """Final held-out metrics (eval report, else the training summary)."""
    metrics_source: str = ""
    frequencies: torch.Tensor | None = None
    """[L] firing frequency per latent from the evaluation (``eval/latents.safetensors``), if any."""
    source: Path | str = ""
