"""Consolidate and reshard latent-parallel checkpoints.

    python -m sae.train.reshard consolidate runs/x/final/topk runs/x/final_full/topk
    python -m sae.train.reshard checkpoint runs/x/checkpoints/step_00000100 runs/y --world-size 1

The shards' layout, and the slicing and joining of a model, are in :mod:`.shards`. Resharding
splits a checkpoint's shards again for another world size, together with the Adam moments and
dead-latent counters, so training resumes exactly on the new world size (world size 1 resumes as a
plain single-process run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sae.buffer.atomic import write_json_atomic

from .artifact import load_sae, read_sae_cfg, save_sae
from .checkpoint import LATEST, MANIFEST, load_trainer_state, read_manifest, shard_dir, state_file
from .run_dir import IDENTITY, identity_diff
from .shards import consolidate_sae, shard_folders, shard_part


def reshard_checkpoint(ckpt: str | Path, out_dir: str | Path, world_size: int) -> Path:
    """Write ``<out_dir>/checkpoints/<step>`` for ``world_size`` ranks from a latent-parallel checkpoint
    (TopK SAEs and cross-layer transcoders: weights, Adam moments and dead-latent counters)."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    old_world = manifest["world_size"]
    if manifest["strategy"] != "latent":
        raise ValueError(f"{ckpt} was written with strategy {manifest['strategy']!r}; only latent-parallel "
                         "checkpoints are sharded")
    if world_size < 1:
        raise ValueError(f"--world-size {world_size}: need at least 1 process")
    # Every SAE must split evenly: checked from the shards' metadata before anything is written.
    for name in manifest["saes"]:
        first = shard_folders(ckpt / name)[0]
        groups = load_sae(first).latent_groups  # one shard: a slice of the model
        per_group = read_sae_cfg(first)["shard"]["full_num_latents"] // groups
        if per_group % world_size:
            what = "latents per layer of cross-layer transcoder" if groups > 1 else "latents of SAE"
            raise ValueError(f"the {per_group} {what} {name!r} do not split evenly over {world_size} ranks; "
                             f"choose a world size that divides {per_group}")
    identity = _resharded_identity(ckpt, Path(out_dir), world_size)
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
        full = consolidate_sae(ckpt / name)  # one SAE in memory at a time
        meta = read_sae_cfg(shard_folders(ckpt / name)[0])
        extra = {k: v for k, v in meta.items() if k not in ("architecture", "d_in", "d_out", "num_latents", "sae",
                                                             "shard")}
        axes = full.latent_axes()
        param_names = list(axes)
        # Adam state per parameter index, consolidated over the old shards.
        opt_states = [s["optimizers"][name] for s in states]
        full_opt: dict[int, dict[str, torch.Tensor]] = {}
        for i, pname in enumerate(param_names):
            per_rank = [o["state"][i] for o in opt_states if i in o["state"]]
            if not per_rank:
                continue
            ax = axes[pname]
            full_opt[i] = {k: torch.cat([r[k] for r in per_rank], ax) if ax is not None and v.dim() > 0 else v
                           for k, v in per_rank[0].items()}
        # Dead-latent counters: [groups, latents per group] on each rank (a CLT's layers; one group for an SAE).
        dead = torch.cat([s["trackers"][name]["tokens_since_fired"].view(full.latent_groups, -1) for s in states], 1)
        for r in range(world_size):
            if world_size == 1:
                part, folder, shard_meta = full, tmp / name, {}
            else:
                part, shard_meta = shard_part(full, r, world_size)
                folder = tmp / name / shard_dir(r, world_size)
            save_sae(part, folder, **extra, **shard_meta)
            opt = {"state": {}, "param_groups": opt_states[0]["param_groups"]}
            for i, st in full_opt.items():
                ax = axes[param_names[i]]
                opt["state"][i] = {k: (v.chunk(world_size, ax)[r].clone() if ax is not None and v.dim() > 0 else v)
                                   for k, v in st.items()}
            new_states[r]["optimizers"][name] = opt
            new_states[r]["trackers"][name] = {"tokens_since_fired": dead.chunk(world_size, 1)[r].reshape(-1).clone()}
    for r, st in enumerate(new_states):
        torch.save(st, tmp / state_file(r))
    strategy = "latent" if world_size > 1 else "none"
    write_json_atomic(tmp / MANIFEST, {**manifest, "world_size": world_size, "strategy": strategy})
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    (root / LATEST).write_text(final.name)
    if identity is not None:  # a resume in out_dir is still checked against the run's settings
        write_json_atomic(Path(out_dir) / IDENTITY, identity)
    return final


def _resharded_identity(ckpt: Path, out_dir: Path, world_size: int) -> dict[str, Any] | None:
    """The checkpoint's run identity (``run.json``) for ``world_size`` ranks, or None when the run
    has none (older runs).

    Raises:
        ValueError: ``out_dir`` holds another run's ``run.json`` (settings other than the world size
            and strategy differ, or the checkpoint's run has no identity to compare it with).
    """
    source_dir = ckpt.resolve().parent.parent
    source = source_dir / IDENTITY
    ours = None
    if source.is_file():
        ours = {**json.loads(source.read_text()), "world_size": world_size,
                "strategy": "latent" if world_size > 1 else "none"}
    target = out_dir / IDENTITY
    if target.is_file() and out_dir.resolve() != source_dir:
        theirs = json.loads(target.read_text())
        if ours is None:
            raise ValueError(f"{out_dir} holds a run ({IDENTITY}) and the run of {ckpt} has no {IDENTITY} to compare "
                             "it with; reshard into an empty folder")
        diff = identity_diff({k: v for k, v in theirs.items() if k not in ("world_size", "strategy")},
                             {k: v for k, v in ours.items() if k not in ("world_size", "strategy")})
        if diff:
            raise ValueError(f"{out_dir} holds a different run; it differs in: {'; '.join(diff)}. Reshard into an "
                             "empty folder or that run's own")
    return ours


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
