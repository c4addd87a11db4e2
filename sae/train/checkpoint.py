"""Atomic training checkpoints and exact resume.

Layout under ``<out_dir>/checkpoints``::

    step_00000100/<sae name>/sae.safetensors, cfg.json   portable weights
    step_00000100/trainer_state.pt                       optimiser, schedule, dead counters,
                                                          step, RNG, data position
    latest                                               name of the newest complete checkpoint

A checkpoint is built in a temporary folder and renamed into place, then ``latest`` is replaced
atomically: a crash leaves either the old or the new checkpoint, never half of one. Trainer state
holds only tensors and plain containers and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .artifact import fsync_dir, save_sae

STATE = "trainer_state.pt"
LATEST = "latest"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir: str | Path, step: int, saes: dict[str, Any], state: dict[str, Any],
                    keep: int = 2, sae_extra: dict[str, Any] | None = None) -> Path:
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, sae in saes.items():
            save_sae(sae, tmp / name, **(sae_extra or {}))
        with (tmp / STATE).open("wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    latest_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / LATEST)
    fsync_dir(root)
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in done[:-keep] if keep > 0 else []:
        if p.name != newest:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no {STATE}; the checkpoint folder was altered")
    return path


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
