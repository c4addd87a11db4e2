"""Latent-parallel shards of one SAE: slicing a model into per-rank parts and joining them again.

A latent-parallel SAE of width L on W ranks is stored as W folders ``shard_RR_of_WW`` holding
rows [r L/W, (r+1) L/W) of W_enc, b_enc, W_dec (b_dec and W_skip replicated); a cross-layer
transcoder's shards hold that slice of every layer's latents (its W_enc, b_enc and
log_threshold along dim 1, each W_dec[i] along dim 0). Each family says how its latents split and
join (:meth:`~sae.models.SparseCoder.latent_axes`, ``latent_shard``, ``join_latent_shards``);
training slices through them (:mod:`sae.train.strategy`), evaluation and export join with
:func:`consolidate_sae`, and :mod:`sae.train.reshard` splits checkpoints for another world size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sae.models import SparseCoder

from .artifact import load_sae, read_sae_cfg


def shard_folders(folder: Path) -> list[Path]:
    shards = sorted(folder.glob("shard_*_of_*"))
    if not shards:
        raise FileNotFoundError(f"{folder} holds no shard_RR_of_WW folders: not a latent-parallel SAE")
    world = int(shards[0].name.rsplit("_", 1)[1])
    if len(shards) != world:
        raise ValueError(f"{folder} has {len(shards)} shard folders but they say world size {world}")
    return shards


def consolidate_sae(folder: str | Path) -> SparseCoder:
    """The full SAE from a folder of latent-parallel shards (a plain SAE folder loads as is), joined by
    its family (:meth:`~sae.models.SparseCoder.join_latent_shards`)."""
    folder = Path(folder)
    if (folder / "sae.safetensors").is_file():
        return load_sae(folder)
    shards = shard_folders(folder)
    parts = [load_sae(p) for p in shards]
    return parts[0].join_latent_shards(parts, read_sae_cfg(shards[0])["shard"]["full_num_latents"])


def shard_part(full: SparseCoder, rank: int, world_size: int) -> tuple[SparseCoder, dict[str, Any]]:
    """Rank ``rank``'s slice of ``full`` and the ``shard`` metadata its folder records."""
    part = full.latent_shard(rank, world_size)
    return part, {"shard": dataclasses.asdict(part.shard)}
