"""A run's checkpointing: its folder's lock and identity, checkpoints, resume and final weights.

The :class:`~sae.train.trainer.Trainer` is handed one (by default
``Checkpointing(cfg.out_dir, keep=cfg.keep_checkpoints)``) and asks it to claim the folder before
training, write a checkpoint, find the state to resume from and write the final weights. The
trainer decides when; this object decides where and in which layout (:mod:`sae.train.checkpoint`,
:mod:`sae.train.run_dir`). The runner builds it with what each SAE's ``cfg.json`` records besides
the SAE itself (data, normalisation, hook point), and uses it to release or clean the folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sae.models import SparseCoder

from . import dist
from .artifact import load_sae, save_sae
from .checkpoint import latest_checkpoint, load_trainer_state, read_manifest, save_checkpoint, shard_dir
from .run_dir import RunFolder

log = logging.getLogger(__name__)


class Checkpointing:
    """Checkpoints and final weights under ``out_dir``, for one run at a time."""

    def __init__(self, out_dir: str | Path, *, keep: int = 2, sae_meta: dict[str, Any] | None = None,
                 sae_meta_by_name: dict[str, dict[str, Any]] | None = None):
        """``keep``: how many checkpoints to keep. ``sae_meta``: extra ``cfg.json`` fields of every SAE;
        ``sae_meta_by_name``: per SAE name, merged over ``sae_meta`` (one hook point each)."""
        self.out_dir = Path(out_dir)
        self.keep = keep
        self.sae_meta = sae_meta or {}
        self.sae_meta_by_name = sae_meta_by_name or {}
        self.folder = RunFolder(out_dir)
        self.claimed = False
        self.moved_aside: Path | None = None  # where a finished run went when a new one claimed the folder

    # --- the folder -----------------------------------------------------------------------
    def claim(self, identity: dict[str, Any], *, resume: bool, total_steps: int) -> None:
        """Lock ``out_dir`` for this run and check it holds this run or nothing (rank 0 checks; every
        rank raises the same error). Idempotent; :meth:`release` gives it back.

        Raises:
            RuntimeError: another run is writing the folder.
            ValueError: it holds a different or a finished run (the message names the differences).
        """
        if self.claimed:
            return
        error = None
        if dist.is_main():
            try:
                moved = self.folder.claim(identity, resume=resume, total_steps=total_steps)
                if moved is not None:
                    self.moved_aside = moved
            except (RuntimeError, ValueError, OSError) as e:
                error = (type(e).__name__, str(e))
        if dist.world_size() > 1:
            error = dist.broadcast_object(error)
        if error is not None:
            raise {"RuntimeError": RuntimeError, "ValueError": ValueError}.get(error[0], OSError)(error[1])
        self.claimed = True

    def release(self) -> None:
        """Unlock ``out_dir`` (the lock also goes when the process ends)."""
        self.folder.release()
        self.claimed = False

    def discard_unused(self) -> bool:
        """After a failure before the first checkpoint: remove what the run wrote (rank 0). True if it did."""
        return dist.is_main() and self.folder.discard_unused()

    # --- what is written ------------------------------------------------------------------
    def meta(self, name: str) -> dict[str, Any]:
        """Extra ``cfg.json`` fields of SAE ``name``."""
        return {**self.sae_meta, **self.sae_meta_by_name.get(name, {})}

    @staticmethod
    def sae_dir(folder: Path, name: str, sae: SparseCoder) -> Path:
        shard = getattr(sae, "shard", None)
        return folder / name / shard_dir(shard.rank, shard.world_size) if shard else folder / name

    def _write_saes(self, folder: Path, saes: dict[str, SparseCoder], strategy) -> dict[str, Path]:
        return {name: save_sae(sae, self.sae_dir(folder, name, sae), **self.meta(name), **strategy.shard_meta(sae))
                for name, sae in saes.items() if strategy.writes_sae(name)}

    def save(self, step: int, saes: dict[str, SparseCoder], strategy, trainer_state: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` (every rank calls it) and drop the oldest beyond ``keep``."""
        meta = {"strategy": strategy.name, "saes": sorted(saes)}
        return save_checkpoint(self.out_dir, step, lambda folder: self._write_saes(folder, saes, strategy),
                               trainer_state, meta, keep=self.keep)

    def resume(self, saes: dict[str, SparseCoder], strategy, device) -> tuple[Path, dict[str, Any]] | None:
        """Load the newest checkpoint's weights into ``saes``; return it and this rank's trainer state,
        or None when there is none.

        Raises:
            ValueError: the checkpoint was written by another number of processes or strategy, or
                lacks some of ``saes`` (the message names the fix).
        """
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            return None
        manifest = read_manifest(ckpt)
        if manifest["world_size"] != dist.world_size() or manifest["strategy"] != strategy.name:
            raise ValueError(
                f"checkpoint {ckpt} was written by {manifest['world_size']} process(es) with strategy "
                f"{manifest['strategy']!r}; this run has {dist.world_size()} with {strategy.name!r}. "
                "Reshard it first (python -m sae.train.reshard) or use a fresh train.out_dir"
            )
        state = load_trainer_state(ckpt, dist.rank())
        missing = set(saes) - set(state["optimizers"])
        if missing:
            raise ValueError(f"checkpoint {ckpt} lacks SAEs {sorted(missing)}; use a fresh train.out_dir")
        for name, sae in saes.items():
            sae.load_state_dict(load_sae(self.sae_dir(ckpt, name, sae), device).state_dict())
        return ckpt, state

    def save_final(self, step: int, saes: dict[str, SparseCoder], strategy) -> dict[str, Path]:
        """Portable weights under ``final/``; latent-parallel shards land in one folder per rank
        (``python -m sae.train.reshard --consolidate`` joins them). Marks the run finished."""
        out = self._write_saes(self.out_dir / "final", saes, strategy)
        dist.barrier()
        if dist.is_main():
            self.folder.mark_finished(step)
        return out
