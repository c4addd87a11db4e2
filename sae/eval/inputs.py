"""What an SAE is evaluated on: its rows (buffer, live model or synthetic), the normalisers it
trained with and, for splicing and examples, the model, opened from the SAE's cfg.json ``data``
section (:func:`open_inputs`; a CLT's in :func:`sae.eval.clt.clt_inputs`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sae.buffer.config import DataConfig
from sae.buffer.manifest import read_manifest
from sae.buffer.normalize import Normalizer
from sae.harvest.config import ModelConfig
from sae.harvest.harvester import Harvester
from sae.harvest.model import LoadedModel
from sae.harvest.text import load_text_dataset

from .config import EvalConfig
from .data import (
    EvalSet,
    buffer_rows,
    harvest_config_from_manifest,
    live_rows,
    synthetic_rows,
    text_config_from_manifest,
)
from .lm import load_eval_model, normalizer_from_dict


@dataclass
class EvalInputs:
    """What the SAE is evaluated on, opened from its training data section."""

    rows: EvalSet
    hookpoint: str
    target_hookpoint: str
    x_norm: Normalizer
    y_norm: Normalizer
    lm: LoadedModel | None = None
    kind: str = ""
    harvester: Harvester | None = None
    text: Any = None
    """TextConfig of the harvest (for rebuilding splice contexts)."""
    ds: Any = None
    """The opened text dataset (None: opened when splicing needs it)."""
    mean: torch.Tensor | None = None
    """Raw mean of the replaced hook point for the mean ablation (None: from the splice contexts)."""
    no_model: str = ""
    """Why there is no model (synthetic data), for the report."""

    def attach_buffer_model(self, cfg: EvalConfig, manifest: dict[str, Any], hookpoints: list[str]) -> None:
        """When splicing or examples need it: the model, text and a harvester of ``hookpoints`` as the
        buffer's manifest records them."""
        if not (cfg.splice.enabled or cfg.examples.num_latents > 0):
            return
        m = manifest["model"]
        model = ModelConfig(name=m["name"], revision=m.get("revision", ""), dtype=m.get("dtype", "float32"),
                            device=cfg.device)
        self.lm, self.kind = load_eval_model(model, cfg.splice.kind)
        self.text = text_config_from_manifest(manifest)
        self.harvester = Harvester(self.lm, hookpoints, self.text, harvest_config_from_manifest(manifest))


def literal(obj: Any) -> Any:
    """``obj`` with OmegaConf interpolations escaped: a file's ``${oc.env:...}`` stays text."""
    if isinstance(obj, str):
        return obj.replace("${", "\\${")
    if isinstance(obj, dict):
        return {k: literal(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [literal(v) for v in obj]
    return obj


def data_config(meta: dict[str, Any], trust_remote_code: bool = False) -> DataConfig:
    """The DataConfig an SAE was trained with (its cfg.json ``data``); defaults when absent.

    cfg.json is data: nothing in it is resolved (OmegaConf interpolations stay text) and its
    ``trust_remote_code`` is replaced by the caller's (``eval.trust_remote_code``).
    """
    base = OmegaConf.structured(DataConfig)
    try:
        data = OmegaConf.to_object(OmegaConf.merge(base, literal(meta.get("data") or {})))
    except Exception as e:  # noqa: BLE001  (OmegaConf raises several error types)
        raise ValueError(f"the SAE's cfg.json has a data section this version cannot read ({e}); pass eval.source and "
                         "eval.buffer_path explicitly") from e
    data.live.model.trust_remote_code = trust_remote_code
    return data


def _normalizers(meta: dict[str, Any], mode: str, stats: dict[str, Any], hp: str, target: str):
    recorded = meta.get("normalization")
    if recorded:
        return normalizer_from_dict(recorded.get("x")), normalizer_from_dict(recorded.get("y"))
    x = Normalizer.from_sums(mode, stats.get(hp), hp)
    return x, Normalizer.from_sums(mode, stats.get(target), target) if target else Normalizer("none")


def open_inputs(cfg: EvalConfig, meta: dict[str, Any]) -> EvalInputs:
    """Rows, normalisers and (for real models) the model, from the SAE's training data section.

    Raises:
        ValueError / FileNotFoundError: unknown source, missing buffer, unknown hook point.
    """
    data = data_config(meta, cfg.trust_remote_code)
    source = cfg.source or data.source
    if source == "synthetic":
        rows = synthetic_rows(data.synthetic, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size)
        none = Normalizer("none")
        return EvalInputs(rows, "synthetic", "", none, none, no_model="synthetic data has no model or tokens")
    if source == "buffer":
        return _buffer_inputs(cfg, data, meta)
    if source == "live":
        return _live_inputs(cfg, data, meta)
    raise ValueError(f"eval.source={source!r} must be buffer, live or synthetic")


def _buffer_inputs(cfg: EvalConfig, data: DataConfig, meta: dict[str, Any]) -> EvalInputs:
    folder = Path(cfg.buffer_path or data.buffer.path)
    manifest = read_manifest(folder)
    if not data.hookpoint and len(manifest["hookpoint_order"]) != 1:
        raise ValueError(f"buffer {folder} holds {manifest['hookpoint_order']} and the SAE's cfg.json names no "
                         "hook point; evaluate an SAE trained on this buffer")
    hp, target = data.hookpoint or manifest["hookpoint_order"][0], data.target_hookpoint
    x_norm, y_norm = _normalizers(meta, data.normalize, manifest["stats"], hp, target)
    rows = buffer_rows(folder, hp, target, shards=cfg.shards, heldout_shards=data.buffer.heldout_shards,
                       max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, x_norm=x_norm, y_norm=y_norm)
    inputs = EvalInputs(rows, hp, target, x_norm, y_norm)
    stats = manifest["stats"].get(target or hp)
    if stats and stats.get("count"):  # the buffer-wide mean of the replaced point, for the mean ablation
        inputs.mean = torch.tensor(stats["sum"], dtype=torch.float64).div(stats["count"]).float()
    inputs.attach_buffer_model(cfg, manifest, [hp] + ([target] if target else []))
    return inputs


def _live_inputs(cfg: EvalConfig, data: DataConfig, meta: dict[str, Any]) -> EvalInputs:
    live = data.live
    lm, kind = load_eval_model(dataclasses.replace(live.model, device=cfg.device), cfg.splice.kind)
    wanted = [data.hookpoint] + ([data.target_hookpoint] if data.target_hookpoint else [])
    harvester = Harvester(lm, wanted, live.text, dataclasses.replace(live.harvest, progress=False))
    hp, target = harvester.names[0], (harvester.names[1] if data.target_hookpoint else "")
    recorded = meta.get("normalization") or {}
    x_norm, y_norm = normalizer_from_dict(recorded.get("x")), normalizer_from_dict(recorded.get("y"))
    ds = load_text_dataset(live.text)
    rows = live_rows(harvester, ds, hp, target, contexts=live.heldout_contexts, max_tokens=cfg.max_tokens,
                     batch_size=cfg.batch_size, x_norm=x_norm, y_norm=y_norm)
    return EvalInputs(rows, hp, target, x_norm, y_norm, lm, kind, harvester, live.text, ds)
