"""Process body for the 2-process W&B test (importable by torch.multiprocessing spawn)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def run_data_parallel(rank: int, world: int, port: int, out: str, overrides: list[str]) -> None:
    """Train with ``train.parallel=data`` as torchrun would start it; record W&B logger constructions."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), WANDB_MODE="offline")
    torch.set_num_threads(1)
    import sae.runners.train as run_mod
    from sae.runners.config import compose_train_config
    from sae.train import dist

    built = []
    real = run_mod.WandbLogger

    def counting(*args, **kwargs):
        built.append(rank)
        return real(*args, **kwargs)

    run_mod.WandbLogger = counting
    try:
        run_mod.run_training(compose_train_config(overrides), heldout=1)
        # Leave together, as sae-train does (sae/runners/cli.py): rank 0 evaluates and finishes W&B alone
        # after training, and a gloo group torn down on one rank meanwhile can abort its peer.
        dist.barrier()
    finally:
        dist.destroy()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"wandb_loggers": len(built)}))
