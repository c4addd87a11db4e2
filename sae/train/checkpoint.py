"""Atomic (and, across ranks, sharded) training checkpoints with exact resume.

Layout under ``<out_dir>/checkpoints``::

    step_00000100/checkpoint.json                  step, world size, strategy (written last)
    step_00000100/<sae>/sae.safetensors, cfg.json  portable weights (replicated SAEs)
    step_00000100/<sae>/shard_01_of_02/...         latent-parallel shards, one per rank
    step_00000100/trainer_state_rank1.pt           per rank: optimiser, schedule, dead counters,
                                                   step, RNG, data position
    latest                                         name of the newest complete checkpoint

Every rank writes its parts into one temporary folder; after a barrier rank 0 writes the
manifest, renames the folder into place and replaces ``latest`` atomically: a crash leaves the
old or the new checkpoint, never half of one. Trainer state holds only tensors and plain
containers and loads with ``torch.load(weights_only=True)``. A multi-node run needs ``out_dir``
on a file system every node sees.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae.buffer.atomic import fsync_dir, naming_the_file, write_json_atomic
from sae.paths import inside

from . import dist

MANIFEST = "checkpoint.json"
LATEST = "latest"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def state_file(rank: int) -> str:
    return f"trainer_state_rank{rank}.pt"


def shard_dir(rank: int, world_size: int) -> str:
    return f"shard_{rank:02d}_of_{world_size:02d}"


def save_checkpoint(out_dir: str | Path, step: int, write_parts: Callable[[Path], None], state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Collective: every rank calls it. ``write_parts(folder)`` writes this rank's SAE weights."""
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    try:
        write_parts(tmp)
        path = tmp / state_file(dist.rank())
        with naming_the_file(final / state_file(dist.rank())), path.open("wb") as fh:
            try:
                torch.save(state, fh)
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                raise TypeError(f"could not write the trainer state to {final / state_file(dist.rank())}: {e}. "
                                "Every state_dict in it (the activation source's included) must hold only tensors, "
                                "numbers, strings, lists and dicts") from e
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        if dist.world_size() == 1:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    if dist.is_main():
        write_json_atomic(tmp / MANIFEST, {"step": step, "world_size": dist.world_size(), **meta})
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / LATEST)
        fsync_dir(root)
        _prune(root, keep, final.name)
    dist.barrier()
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
    path = inside(root, pointer.read_text().strip(), str(pointer))  # never a folder outside checkpoints/
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no {MANIFEST}; the checkpoint was altered")
    return path


def read_manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MANIFEST).read_text())


def load_trainer_state(ckpt: Path, rank: int = 0) -> dict[str, Any]:
    path = ckpt / state_file(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} has no trainer state for rank {rank}; was it written with another world size?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and plain data
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} holds objects other than tensors and plain data ({reason}); it was not written by "
                         f"sae-forge or was edited and is not loaded: remove {ckpt} to resume from an earlier "
                         "checkpoint, or start over with train.resume=false") from None
