"""Latent-parallel shards of one SAE: slicing a model into per-rank parts and joining them again.

A latent-parallel SAE of width L on W ranks is stored as W folders ``shard_RR_of_WW`` holding
rows [r L/W, (r+1) L/W) of W_enc, b_enc, W_dec (b_dec and W_skip replicated); a cross-layer
transcoder's shards hold that slice of every layer's latents (its W_enc, b_enc and
log_threshold along dim 1, each W_dec[i] along dim 0). Training slices with :func:`shard_topk` /
:func:`shard_clt` (:mod:`sae.train.strategy`), evaluation and export join with
:func:`consolidate_sae`, and :mod:`sae.train.reshard` splits checkpoints for another world size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from sae.models import SAEConfig, SparseCoder, build_sae
from sae.models.clt import CrossLayerTranscoder
from sae.models.topk import TopKSAE

from .artifact import load_sae, read_sae_cfg


@dataclasses.dataclass(frozen=True)
class Shard:
    rank: int
    world_size: int
    offset: int
    full_num_latents: int


def shard_topk(full: TopKSAE, rank: int, world_size: int) -> TopKSAE:
    """The rows [rank * L/W, (rank + 1) * L/W) of ``full`` as a TopK SAE of width L/W."""
    L = full.num_latents
    if L % world_size:
        raise ValueError(f"num_latents={L} is not divisible by the latent-parallel world size {world_size}")
    Lr = L // world_size
    cfg = dataclasses.replace(full.cfg, num_latents=Lr)
    local = type(full)(cfg, full.d_in, full.d_out)
    local.k_aux = full.k_aux
    sl = slice(rank * Lr, (rank + 1) * Lr)
    with torch.no_grad():
        local.W_enc.copy_(full.W_enc[sl])
        local.b_enc.copy_(full.b_enc[sl])
        local.W_dec.copy_(full.W_dec[sl])
        local.b_dec.copy_(full.b_dec)
        if full.W_skip is not None:
            local.W_skip.copy_(full.W_skip)
    local.shard = Shard(rank, world_size, rank * Lr, L)
    return local


LATENT_AXIS = {"W_enc": 1, "b_enc": 1, "log_threshold": 1}


def shard_clt(full: CrossLayerTranscoder, rank: int, world_size: int) -> CrossLayerTranscoder:
    """Latents [rank L/W, (rank + 1) L/W) of every group of ``full`` as a CLT of width L/W per layer."""
    L = full.latents_per_layer
    if L % world_size:
        raise ValueError(f"a CLT's latents per layer ({L}: sae.num_latents, or sae.expansion_factor x d_model) "
                         f"must divide evenly over the {world_size} latent-parallel ranks; choose a multiple of "
                         f"{world_size}")
    Lr = L // world_size
    # The slice may hold fewer latents than k (the global selection takes k over all ranks): build it
    # with a k it accepts, then give it the model's own.
    local = CrossLayerTranscoder(dataclasses.replace(full.cfg, num_latents=Lr, k=max(1, min(full.k, Lr - 1))),
                                 full.d_in, full.d_out)
    local.cfg, local.k = dataclasses.replace(full.cfg, num_latents=Lr), full.k
    local.full_latents_per_layer, local.k_aux = L, full.k_aux
    if hasattr(full, "num_candidates"):
        local.num_candidates = full.num_candidates
    sl = slice(rank * Lr, (rank + 1) * Lr)
    state = {k: v[:, sl] if k in LATENT_AXIS else v[sl] if k.startswith("W_dec.") else v
             for k, v in full.state_dict().items()}
    local.load_state_dict(state)
    local.mark_normalized()  # decoder rows are whole on each rank: unit norm as in ``full``
    local.shard = Shard(rank, world_size, rank * Lr, full.num_latents)
    return local


SHARDED = ("W_enc", "b_enc", "W_dec")


def shard_folders(folder: Path) -> list[Path]:
    shards = sorted(folder.glob("shard_*_of_*"))
    if not shards:
        raise FileNotFoundError(f"{folder} holds no shard_RR_of_WW folders: not a latent-parallel SAE")
    world = int(shards[0].name.rsplit("_", 1)[1])
    if len(shards) != world:
        raise ValueError(f"{folder} has {len(shards)} shard folders but they say world size {world}")
    return shards


def _full_config(meta: dict[str, Any]) -> tuple[SAEConfig, int]:
    full_L = meta["shard"]["full_num_latents"]
    cfg = SAEConfig(**{**meta["sae"], "num_latents": full_L})
    return cfg, full_L


def consolidate_sae(folder: str | Path) -> SparseCoder:
    """The full SAE from a folder of latent-parallel shards (a plain SAE folder loads as is)."""
    folder = Path(folder)
    if (folder / "sae.safetensors").is_file():
        return load_sae(folder)
    shards = shard_folders(folder)
    meta = read_sae_cfg(shards[0])
    parts = [load_sae(p) for p in shards]
    states = [p.state_dict() for p in parts]
    if meta["architecture"] == "clt":  # every layer's latents sliced alike
        n = meta["sae"]["clt_layers"]
        L = meta["shard"]["full_num_latents"] // n
        full = CrossLayerTranscoder(dataclasses.replace(parts[0].cfg, num_latents=L), meta["d_in"], meta["d_out"])
    else:
        cfg, _ = _full_config(meta)
        full = build_sae(cfg, meta["d_in"], meta["d_out"])
    axes = latent_axes(full)
    full.load_state_dict({k: v if axes.get(k) is None else torch.cat([s[k] for s in states], axes[k])
                          for k, v in states[0].items()})
    if isinstance(full, CrossLayerTranscoder):
        full.mark_normalized()
    return full


def latent_axes(full: SparseCoder) -> dict[str, int | None]:
    """Parameter name -> the axis latent-parallel ranks split it along (None: replicated)."""
    names = [n for n, _ in full.named_parameters()]
    if isinstance(full, CrossLayerTranscoder):  # every layer's group sliced alike; W_dec.i on its rows
        return {n: LATENT_AXIS.get(n, 0 if n.startswith("W_dec.") else None) for n in names}
    return {n: 0 if n in SHARDED else None for n in names}


def shard_part(full: SparseCoder, rank: int, world_size: int) -> tuple[SparseCoder, dict[str, Any]]:
    """Rank ``rank``'s slice of ``full`` and the ``shard`` metadata its folder records."""
    part = (shard_clt if isinstance(full, CrossLayerTranscoder) else shard_topk)(full, rank, world_size)
    return part, {"shard": dataclasses.asdict(part.shard)}
