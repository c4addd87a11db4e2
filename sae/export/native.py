"""Our own export format: the training artefact (``sae.safetensors`` + ``cfg.json``), unchanged.

The weights and config are exactly what training wrote (normalisation stays recorded in cfg.json
and is applied by ``sae-eval`` and :func:`sae.export.load.load_pretrained` users alike), plus a
``provenance`` section (hook points, model, tokens, steps, final metrics) for the model card.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from sae.models import SparseCoder
from sae.train.artifact import CFG, WEIGHTS, load_sae, read_sae_cfg, save_sae

from .source import ExportItem

FILES = (WEIGHTS, CFG)
_BASE_KEYS = ("architecture", "d_in", "d_out", "num_latents", "sae", "shard")


def write_native(item: ExportItem, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write ``item`` in our format into ``folder`` (created)."""
    extra: dict[str, Any] = {k: v for k, v in item.meta.items() if k not in _BASE_KEYS}
    if "data" not in extra and item.hookpoint:  # a converted SAE: sae-eval then finds its hook points in a buffer
        extra["data"] = {"source": "buffer", "hookpoint": item.hookpoint, "target_hookpoint": item.target_hookpoint}
    extra["provenance"] = {"name": item.name, "hookpoint": item.hookpoint, "target_hookpoint": item.target_hookpoint,
                           "model": item.model_name, "tokens": item.tokens, "steps": item.steps,
                           "metrics": item.metrics}
    sae = item.sae if dtype == torch.float32 else copy.deepcopy(item.sae).to(dtype)
    save_sae(sae, folder, **extra)


def read_native(folder: Path) -> tuple[SparseCoder, dict[str, Any]]:
    """(SAE, cfg.json) of a folder in our format."""
    meta = read_sae_cfg(folder)
    sae = load_sae(folder)
    if any(p.dtype != torch.float32 for p in sae.parameters()):
        sae = sae.float()
    return sae, meta
