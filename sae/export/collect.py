"""What ``sae-export`` reads: the SAEs of a checkpoint and what is known about their training.

Accepted inputs (export stage, after train -> eval):

- one SAE folder written by training (``final/<name>/`` or ``checkpoints/step_N/<name>/``);
- a folder of latent-parallel shards (``shard_RR_of_WW``), joined with :func:`consolidate_sae`;
- a checkpoint step folder (``checkpoints/step_N/``), a ``final/`` folder or a run folder: every SAE
  inside;
- a folder (or Hub repo id) in another supported format (SAELens, sparsify), read through
  :func:`sae.export.load.load_pretrained`, so published SAEs convert to our format.

Provenance (tokens trained, steps, final metrics) comes from the run's ``summary.json``, the
checkpoint's ``checkpoint.json`` and trainer state, and the SAE's evaluation report
(``<sae>/eval/report.json`` written by ``sae-eval``), whichever exist.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from sae.train.artifact import CFG, WEIGHTS, read_sae_cfg
from sae.train.checkpoint import MANIFEST, state_file
from sae.train.shards import consolidate_sae

from .item import ExportItem
from .load import load_pretrained_with_info

log = logging.getLogger(__name__)

#: Metrics copied from an evaluation report or the training summary into model cards.
CARD_METRICS = ("fvu", "explained_variance", "mse", "cosine", "l0", "dead_fraction", "dense_fraction",
                "feature_recovery")


def _is_sae_dir(p: Path) -> bool:
    return (p / CFG).is_file() and (p / WEIGHTS).is_file() and "sae" in _json(p / CFG)


def _is_shard_dir(p: Path) -> bool:
    return p.is_dir() and any(p.glob("shard_*_of_*/" + CFG))


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _sae_dirs(root: Path) -> list[Path]:
    """SAE folders (plain or sharded) directly inside ``root``."""
    return sorted(p for p in root.iterdir() if p.is_dir() and (_is_sae_dir(p) or _is_shard_dir(p)))


def find_sae_folders(path: Path) -> list[Path]:
    """The SAE folders a path names: itself, its children, or its ``final/`` children.

    Raises:
        FileNotFoundError: nothing exportable there.
    """
    if _is_sae_dir(path) or _is_shard_dir(path):
        return [path]
    for root in (path, path / "final"):
        if root.is_dir():
            found = _sae_dirs(root)
            if found:
                return found
    raise FileNotFoundError(
        f"{path} holds no SAE written by sae-train (a folder with {CFG} and {WEIGHTS}, latent-parallel "
        "shard_RR_of_WW folders, a checkpoint step folder, final/ or a run folder)")


def _run_info(sae_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary.json of the run, checkpoint.json of the step) around an SAE folder, when present."""
    parent = sae_dir.parent
    if (parent / MANIFEST).is_file():  # checkpoints/step_N/<name>
        return _json(parent.parent.parent / "summary.json"), _json(parent / MANIFEST)
    if parent.name == "final":
        return _json(parent.parent / "summary.json"), {}
    return {}, {}


def _checkpoint_tokens(step_dir: Path) -> int | None:
    path = step_dir / state_file(0)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state.get("tokens", 0)) or None


def _report_metrics(sae_dir: Path) -> tuple[dict[str, float], str]:
    report = _json(sae_dir / "eval" / "report.json")
    metrics = report.get("metrics") or {}
    out = {k: float(metrics[k]) for k in CARD_METRICS if isinstance(metrics.get(k), (int, float))}
    splice = (report.get("splice") or {}).get("metrics") or {}
    for k, v in splice.items():  # spliced-model fidelity (CE/KL increase, ...)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"splice_{k}"] = float(v)
    return out, str(sae_dir / "eval" / "report.json") if out else ""


def _frequencies(sae_dir: Path) -> torch.Tensor | None:
    path = sae_dir / "eval" / "latents.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path)).get("frequency")


def _hookpoints(meta: dict[str, Any]) -> tuple[str, str, str]:
    """(hook point, target hook point, model name) from an SAE's cfg.json data section."""
    data = meta.get("data") or {}
    hp, target, model = data.get("hookpoint", ""), data.get("target_hookpoint", ""), ""
    if data.get("source") == "live":
        model = ((data.get("live") or {}).get("model") or {}).get("name", "")
    elif data.get("source") == "buffer":
        manifest = _json(Path((data.get("buffer") or {}).get("path", "")) / "manifest.json")
        model = (manifest.get("model") or {}).get("name", "")
        names = list(manifest.get("hookpoints") or {})
        if not hp and len(names) == 1:
            hp = names[0]
    return hp, target, model


def read_trained(sae_dir: Path) -> ExportItem:
    """One SAE folder written by training (or its shards), with provenance."""
    if _is_sae_dir(sae_dir):
        meta = read_sae_cfg(sae_dir)
        from sae.train.artifact import load_sae

        sae = load_sae(sae_dir)
    else:
        sae = consolidate_sae(sae_dir)
        meta = read_sae_cfg(sorted(sae_dir.glob("shard_*_of_*"))[0])
        meta.pop("shard", None)
    hp, target, model = _hookpoints(meta)
    summary, manifest = _run_info(sae_dir)
    item = ExportItem(sae_dir.name, sae, meta, hp, target, model, source=sae_dir)
    if manifest:
        item.steps = int(manifest["step"])
        item.tokens = _checkpoint_tokens(sae_dir.parent)
    elif summary:
        item.steps, item.tokens = summary.get("steps"), summary.get("tokens")
        held = (summary.get("eval") or {}).get(sae_dir.name) or {}
        item.metrics = {k: float(held[k]) for k in CARD_METRICS if isinstance(held.get(k), (int, float))}
        item.metrics_source = "training summary (held-out batches)" if item.metrics else ""
    report, where = _report_metrics(sae_dir)
    if report:
        item.metrics, item.metrics_source = report, where
    item.frequencies = _frequencies(sae_dir)
    return item


def collect(path: str | Path, hookpoint: str | None = None) -> list[ExportItem]:
    """Every SAE that ``path`` names, ready to export.

    ``path`` is a training output (see the module docstring) or a folder / Hub repo id in
    another supported format; ``hookpoint`` picks one SAE of a multi-SAE foreign folder or repo.

    Raises:
        FileNotFoundError: nothing exportable at ``path``.
    """
    p = Path(path)
    if not p.exists():
        return _foreign(path, hookpoint)  # a Hub repo id
    try:
        folders = find_sae_folders(p)
    except FileNotFoundError:
        return _foreign(path, hookpoint)  # a SAELens or sparsify folder (or nothing: its error says so)
    return [read_trained(d) for d in folders]


def _foreign(path: str | Path, hookpoint: str | None) -> list[ExportItem]:
    loaded = load_pretrained_with_info(path, hookpoint)
    return [ExportItem(loaded.name, loaded.sae, {}, loaded.hookpoint, loaded.target_hookpoint, loaded.model_name,
                       source=str(path))]
