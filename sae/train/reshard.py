"""Consolidate and reshard latent-parallel checkpoints.

    python -m sae.train.reshard consolidate runs/x/final/topk runs/x/final_full/topk
    python -m sae.train.reshard checkpoint runs/x/checkpoints/step_00000100 runs/y --world-size 1

A latent-parallel SAE of width L on W ranks is stored as W folders ``shard_RR_of_WW`` holding
rows [r L/W, (r+1) L/W) of W_enc, b_enc, W_dec (b_dec and W_skip replicated). Consolidation
concatenates the rows; resharding splits them again for another world size, together with the
Adam moments and dead-latent counters, so training resumes exactly on the new world size
(world size 1 resumes as a plain single-process run).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sae.buffer.atomic import write_json_atomic
from sae.models import SAEConfig, SparseCoder, build_sae

from .artifact import read_sae_cfg, save_sae
from .checkpoint import LATEST, MANIFEST, load_trainer_state, read_manifest, shard_dir, state_file
from .strategy import Shard

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
    """The full SAE from a folder of latent-parallel shards (or a plain SAE folder)."""
    from .artifact import load_sae

    folder = Path(folder)
    if (folder / "sae.safetensors").is_file():
        return load_sae(folder)
    meta = read_sae_cfg(shard_folders(folder)[0])
    if meta["architecture"] == "clt":  # every layer's latents sliced: joined by its own code
        from .clt_parallel import consolidate

        return consolidate(folder)
    parts = [load_sae(p) for p in shard_folders(folder)]
    cfg, _ = _full_config(meta)
    full = build_sae(cfg, meta["d_in"], meta["d_out"])
    state = {k: torch.cat([p.state_dict()[k] for p in parts]) if k in SHARDED else parts[0].state_dict()[k]
             for k in parts[0].state_dict()}
    full.load_state_dict(state)
    return full


def _split(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    if t.shape[0] % world:
        raise ValueError(f"cannot split {t.shape[0]} latents over {world} ranks evenly")
    return list(t.chunk(world))


def reshard_checkpoint(ckpt: str | Path, out_dir: str | Path, world_size: int) -> Path:
    """Write ``<out_dir>/checkpoints/<step>`` for ``world_size`` ranks from a latent-parallel checkpoint."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    old_world = manifest["world_size"]
    if manifest["strategy"] != "latent":
        raise ValueError(f"{ckpt} was written with strategy {manifest['strategy']!r}; only latent-parallel "
                         "checkpoints are sharded")
    for name in manifest["saes"]:
        if read_sae_cfg(shard_folders(ckpt / name)[0])["architecture"] == "clt":
            raise ValueError(f"{ckpt / name} is a latent-parallel cross-layer transcoder: resharding its checkpoints "
                             f"to another world size is not supported yet; resume it with {old_world} processes, or "
                             "join its final weights with `python -m sae.train.reshard consolidate`")
    states = [load_trainer_state(ckpt, r) for r in range(old_world)]
    root = Path(out_dir) / "checkpoints"
    final = root / ckpt.name
    tmp = root / f".{ckpt.name}.reshard-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    new_states: list[dict[str, Any]] = [
        {k: v for k, v in states[0].items() if k not in ("optimizers", "trackers")} | {"optimizers": {}, "trackers": {}}
        for _ in range(world_size)
    ]
    for name in manifest["saes"]:
        full = consolidate_sae(ckpt / name)
        meta = read_sae_cfg(shard_folders(ckpt / name)[0])
        extra = {k: v for k, v in meta.items() if k not in ("architecture", "d_in", "d_out", "num_latents", "sae",
                                                             "shard")}
        param_names = [n for n, _ in full.named_parameters()]
        # Adam state per parameter index, consolidated over the old shards.
        opt_states = [s["optimizers"][name] for s in states]
        full_opt: dict[int, dict[str, torch.Tensor]] = {}
        for i, pname in enumerate(param_names):
            per_rank = [o["state"][i] for o in opt_states if i in o["state"]]
            if not per_rank:
                continue
            full_opt[i] = {k: torch.cat([r[k] for r in per_rank]) if pname in SHARDED and v.dim() > 0 else v
                           for k, v in per_rank[0].items()}
        dead = torch.cat([s["trackers"][name]["tokens_since_fired"] for s in states])
        for r in range(world_size):
            if world_size == 1:
                part, folder, shard_meta = full, tmp / name, {}
            else:
                from .strategy import shard_topk

                part = shard_topk(full, r, world_size)
                folder = tmp / name / shard_dir(r, world_size)
                shard_meta = {"shard": dataclasses.asdict(Shard(r, world_size, r * full.num_latents // world_size,
                                                                full.num_latents))}
            save_sae(part, folder, **extra, **shard_meta)
            opt = {"state": {}, "param_groups": opt_states[0]["param_groups"]}
            for i, st in full_opt.items():
                opt["state"][i] = {k: (_split(v, world_size)[r].clone() if param_names[i] in SHARDED and v.dim() > 0
                                       else v) for k, v in st.items()}
            new_states[r]["optimizers"][name] = opt
            new_states[r]["trackers"][name] = {"tokens_since_fired": _split(dead, world_size)[r].clone()}
    for r, st in enumerate(new_states):
        torch.save(st, tmp / state_file(r))
    strategy = "latent" if world_size > 1 else "none"
    write_json_atomic(tmp / MANIFEST, {**manifest, "world_size": world_size, "strategy": strategy})
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    (root / LATEST).write_text(final.name)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="join the shards of one SAE into a portable folder")
    c.add_argument("shards", type=Path)
    c.add_argument("out", type=Path)
    r = sub.add_parser("checkpoint", help="reshard a training checkpoint to another world size")
    r.add_argument("checkpoint", type=Path)
    r.add_argument("out_dir", type=Path)
    r.add_argument("--world-size", type=int, required=True)
    a = p.parse_args(argv)
    if a.cmd == "consolidate":
        meta = read_sae_cfg(shard_folders(a.shards)[0])
        extra = {k: v for k, v in meta.items() if k not in ("architecture", "d_in", "d_out", "num_latents", "sae",
                                                             "shard")}
        print(save_sae(consolidate_sae(a.shards), a.out, **extra))
    else:
        print(reshard_checkpoint(a.checkpoint, a.out_dir, a.world_size))


if __name__ == "__main__":
    main()
