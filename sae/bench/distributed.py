"""Distributed scaling benchmark: 1 vs 2 processes for each strategy (gloo on CPU, NCCL on GPU).

    python -m sae.bench.distributed [--d 256 --expansion 16 --k 32 --batch 1024 --steps 12]

For each strategy it prints tokens/s with 1 and 2 processes, the scaling efficiency, and the
bytes each rank sends per step through the collectives (counted in ``sae.train.dist``):

- data:   each rank takes its own batch; efficiency = tok/s(2) / (2 tok/s(1)).
- latent: both ranks take the same batch, each holds half the latents; efficiency = speed-up / 2.
- sae:    two SAEs; one process trains both, or each rank trains one; efficiency as for data.

On a 2-core machine each process gets one thread, so "1 process" uses one core: the comparison is
of the same hardware per process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from sae.bench.common import markdown_table
from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
from sae.models import SAEConfig, build_sae
from sae.train import dist
from sae.train.config import TrainConfig
from sae.train.strategy import build_strategy
from sae.train.trainer import Trainer


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: dict, strategy: str, queue) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        tdist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    strat = build_strategy(strategy)
    r, w = strat.data_split()
    d = args["d"]
    src = SyntheticSource(SyntheticConfig(d=d, num_features=2 * d, active_prob=0.02), args["batch"], rank=r,
                          world_size=w)
    cfg = SAEConfig(expansion_factor=args["expansion"], k=args["k"])
    saes = {"a": build_sae(cfg, d, seed=0)}
    if strategy == "sae":
        saes["b"] = build_sae(cfg, d, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        tc = TrainConfig(batch_size=args["batch"], steps=10**9, lr=1e-4, progress=False, log_every=10**9,
                         out_dir=tmp)
        trainer = Trainer(tc, saes, src, strategy=strat)
        it = iter(src)
        trainer.init_from_data(next(it))
        for _ in range(2):
            trainer.train_step(next(it))
        batches = [next(it) for _ in range(args["steps"])]
        dist.barrier()
        b0 = dist.STATS.bytes
        t0 = time.perf_counter()
        for b in batches:
            trainer.train_step(b)
        dist.barrier()
        elapsed = time.perf_counter() - t0
    # tokens processed by all ranks together, counted once per SAE trained
    n_saes_total = 2 if strategy == "sae" else 1
    data_ranks = w
    tokens = args["steps"] * args["batch"] * data_ranks * n_saes_total
    if rank == 0:
        queue.put({"tokens_per_s": tokens / elapsed, "bytes_per_step": (dist.STATS.bytes - b0) / args["steps"]})
    dist.destroy()


def measure(strategy: str, world: int, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    if world == 1:
        p = ctx.Process(target=_worker, args=(0, 1, 0, args, strategy if strategy == "sae" else "none", q))
        p.start()
        res = q.get()
        p.join()
        return res
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, strategy, q))
             for port in [_port()] for r in range(world)]
    for p in procs:
        p.start()
    res = q.get()
    for p in procs:
        p.join()
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--strategies", default="data,latent,sae")
    p.add_argument("--json")
    a = p.parse_args(argv)
    args = vars(a)
    rows, results = [], {}
    for strategy in a.strategies.split(","):
        one = measure(strategy, 1, args)
        two = measure(strategy, 2, args)
        eff = two["tokens_per_s"] / (2 * one["tokens_per_s"])
        results[strategy] = {"1": one, "2": two, "efficiency": eff}
        rows.append([strategy, one["tokens_per_s"], two["tokens_per_s"], eff, two["bytes_per_step"] / 2**20])
    print(f"d={a.d}, latents={a.d * a.expansion}, k={a.k}, batch/rank={a.batch}, 1 thread per process, gloo")
    print(markdown_table(["strategy", "tok/s 1 proc", "tok/s 2 procs", "scaling efficiency", "MiB sent/rank/step"],
                         rows))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
