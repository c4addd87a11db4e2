"""Our own export format: the training artefact (``sae.safetensors`` + ``cfg.json``), unchanged.

The weights and config are what training wrote (the normalisation stays recorded in cfg.json:
``sae-eval`` applies it, :func:`sae.export.load.load_pretrained` folds it into the weights by
default), plus a ``provenance`` section (hook points, model, tokens, steps, final metrics) for the
model card, minus any setting that would make a reader run code (:data:`CODE_KEYS`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from sae.models import SparseCoder
from sae.train.artifact import CFG, WEIGHTS, load_sae, read_sae_cfg, save_sae

from .item import ExportItem

FILES = (WEIGHTS, CFG)
_BASE_KEYS = ("architecture", "d_in", "d_out", "num_latents", "sae", "shard")


#: Keys an exported cfg.json never carries: settings that would let a folder make its reader run code.
CODE_KEYS = ("trust_remote_code",)


def without_code_keys(obj: Any) -> Any:
    """``obj`` with every :data:`CODE_KEYS` entry removed, at any depth."""
    if isinstance(obj, dict):
        return {k: without_code_keys(v) for k, v in obj.items() if k not in CODE_KEYS}
    if isinstance(obj, list):
        return [without_code_keys(v) for v in obj]
    return obj


def write_native(item: ExportItem, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write ``item`` in our format into ``folder`` (created), without :data:`CODE_KEYS`."""
    extra: dict[str, Any] = without_code_keys({k: v for k, v in item.meta.items() if k not in _BASE_KEYS})
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
