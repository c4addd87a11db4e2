"""Process bodies for the 2-process gloo tests (importable by torch.multiprocessing spawn)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from safetensors.torch import save_file

from sae.buffer.source import Batch
from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
from sae.models import SAEConfig, build_sae
from sae.train import dist
from sae.train.config import TrainConfig
from sae.train.strategy import build_strategy
from sae.train.trainer import Trainer

D, LATENTS, K = 16, 64, 4
SYN = SyntheticConfig(d=D, num_features=48, active_prob=0.06)


def train_cfg(out_dir, steps, batch, **kw) -> TrainConfig:
    base = dict(batch_size=batch, steps=steps, lr=3e-3, lr_warmup_steps=3, progress=False, log_every=1,
                dead_tokens_threshold=512, out_dir=str(out_dir), seed=0)
    return TrainConfig(**{**base, **kw})


def make_sae(arch="topk", seed=0, **kw):
    return build_sae(SAEConfig(architecture=arch, num_latents=LATENTS, k=K, **kw), D, seed=seed)


class UnionSource:
    """What one process sees when it reads every rank's batch of a step at once."""

    def __init__(self, world: int, batch: int):
        self.inner = SyntheticSource(SYN, batch)
        self.world, self.d_in, self.d_out, self.next = world, D, D, 0

    def __iter__(self):
        while True:
            parts = [self.inner.batch(self.next * self.world + r).x for r in range(self.world)]
            self.next += 1
            yield Batch(torch.cat(parts))

    def state_dict(self):
        return {"next": self.next}

    def load_state_dict(self, s):
        self.next = s["next"]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def save_tensors(path: Path, saes: dict) -> None:
    save_file({f"{n}.{k}": v.detach().contiguous() for n, s in saes.items() for k, v in s.state_dict().items()},
              str(path))


def run_strategy(rank: int, world: int, port: int, out: str, strategy: str, arch: str, steps: int, batch: int,
                 extra: dict) -> None:
    """Train with ``strategy`` and save each rank's SAE tensors to ``out/rank{r}.safetensors``."""
    _init(rank, world, port)
    try:
        strat = build_strategy(strategy)
        r, w = strat.data_split()
        src = SyntheticSource(SYN, batch, rank=r, world_size=w)
        arch, _, target = arch.partition("@")  # "relu@5": the penalty steered to L0 5
        kw = {"target_l0": float(target)} if target else {}
        saes = {"a": make_sae(arch, 0, **kw), "b": make_sae(arch, 1, k_aux=8, **kw)} if strategy == "sae" else \
            {"a": make_sae(arch, 0, **kw)}
        cfg = train_cfg(Path(out) / "run", steps, batch, **extra)
        trainer = Trainer(cfg, saes, src, strategy=strat)
        trainer.fit()
        save_tensors(Path(out) / f"rank{rank}.safetensors", trainer.saes)
        (Path(out) / f"rank{rank}.sparsity.json").write_text(
            json.dumps({n: c.state_dict() for n, c in trainer.sparsity.items()}))
    finally:
        dist.destroy()


def latent_forward_check(rank: int, world: int, port: int, out: str) -> None:
    """Forward/backward of a latent-parallel TopK vs the unsharded SAE on the same batch."""
    from sae.models import fired_counts
    from sae.train.strategy import LatentParallel

    _init(rank, world, port)
    try:
        full = make_sae("topk", 0, k_aux=6)
        x = SyntheticSource(SYN, 128).batch(0).x
        full.init_from_data(x)
        dead = torch.zeros(LATENTS, dtype=torch.bool)
        dead[::3] = True  # AuxK active, dead latents on both shards
        ref = full(x, dead_mask=dead)
        ref.losses["loss"].backward()

        strat = LatentParallel()
        local = strat.prepare({"a": make_sae("topk", 0, k_aux=6)})["a"]
        local.load_state_dict({k: v for k, v in _shard_of(full, rank, world).items()})
        Lr = LATENTS // world
        sl = slice(rank * Lr, (rank + 1) * Lr)
        out_lp = strat.forward(local, x, None, dead_mask=dead[sl])
        out_lp.losses["loss"].backward()

        checks = {
            "x_hat": (out_lp.x_hat, ref.x_hat),
            "fvu": (out_lp.losses["fvu"], ref.losses["fvu"]),
            "auxk": (out_lp.losses["auxk"], ref.losses["auxk"]),
            "W_enc.grad": (local.W_enc.grad, full.W_enc.grad[sl]),
            "b_enc.grad": (local.b_enc.grad, full.b_enc.grad[sl]),
            "W_dec.grad": (local.W_dec.grad, full.W_dec.grad[sl]),
            "b_dec.grad": (local.b_dec.grad, full.b_dec.grad),
            "fired": (fired_counts(out_lp.codes, Lr), fired_counts(ref.codes, LATENTS)[sl]),
        }
        # Codes: gather every rank's (global index, value) pairs and compare as dense [B, L].
        dense_lp = torch.zeros(x.shape[0], LATENTS)
        dense_lp.scatter_add_(1, out_lp.codes.idx + rank * Lr, out_lp.codes.vals.detach())
        dist.all_reduce_(dense_lp)
        dense_ref = torch.zeros(x.shape[0], LATENTS).scatter_add_(1, ref.codes.idx, ref.codes.vals.detach())
        checks["codes"] = (dense_lp, dense_ref)
        for name, (a, b) in checks.items():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name} differs")
        Path(out, f"ok{rank}").write_text("ok")
    finally:
        dist.destroy()


def live_exchange_check(rank: int, world: int, port: int, out: str, model: str, docs: str,
                        pairs: bool = False) -> None:
    """Hook-point parallel, live: each rank harvests its half of the contexts for both hook points;
    after the all-to-all, rank r holds both ranks' rows of hook point ``layers.r``, in rank order.
    ``pairs``: transcoders ``layers.r.mlp_in -> layers.r.mlp``; rank r also gets its targets' rows."""
    from sae.buffer.config import LiveConfig
    from sae.buffer.live import LiveSource
    from sae.train.multi_source import LiveHookpoints

    _init(rank, world, port)
    try:
        cfg = LiveConfig()
        cfg.model.name, cfg.text.name, cfg.text.context_length, cfg.heldout_contexts = model, docs, 32, 8
        hps = ["layers.0.mlp_in", "layers.1.mlp_in"] if pairs else ["layers.0", "layers.1"]
        targets = ["layers.0.mlp", "layers.1.mlp"] if pairs else None

        def live(r):
            return LiveSource(cfg, 32, hookpoints=hps, target_hookpoints=targets, rank=r, world_size=world,
                              normalize="scale")

        got = [b for _, b in zip(range(3), LiveHookpoints(live(rank), needs=[[hps[0]], [hps[1]]]))]
        sources = [live(r) for r in range(world)]  # what each rank harvested, rebuilt here alone
        per_rank = [[b for _, b in zip(range(3), src)] for src in sources]
        mine = hps[rank]
        for step, batch in enumerate(got):
            assert list(batch) == [mine]
            want = torch.cat([sources[0].split(per_rank[r][step].x)[mine] for r in range(world)])
            torch.testing.assert_close(batch[mine].x, want, rtol=0, atol=0)
            if pairs:
                want = torch.cat([sources[0].split(per_rank[r][step].x)[targets[rank]] for r in range(world)])
                torch.testing.assert_close(batch[mine].y, want, rtol=0, atol=0)
            else:
                assert batch[mine].y is None
        Path(out, f"ok{rank}").write_text(str(dist.STATS.bytes))
    finally:
        dist.destroy()


def hookpoint_parallel_run(rank: int, world: int, port: int, out: str, overrides: list) -> None:
    """``sae-train``'s run with train.parallel=sae on 2 ranks (each rank trains its hook points' SAEs)."""
    from sae.runners.config import compose_train_config
    from sae.runners.train import run_training

    _init(rank, world, port)
    try:
        result = run_training(compose_train_config([*overrides, "train.parallel=sae"]))
        Path(out, f"ok{rank}").write_text(",".join(sorted(result.final_dirs)))
        dist.barrier()  # leave together, as sae-train does (see tests/train/wandb_workers.py)
    finally:
        dist.destroy()


def _shard_of(full, rank, world):
    Lr = full.num_latents // world
    sl = slice(rank * Lr, (rank + 1) * Lr)
    return {k: (v[sl] if k in ("W_enc", "b_enc", "W_dec") else v) for k, v in full.state_dict().items()}


def elastic_main() -> None:
    """torchrun entry: data-parallel training that SIGKILLs rank 1 once, at step ``KILL_AT``."""
    out, steps, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    device = dist.init_from_env()
    torch.set_num_threads(1)
    try:
        strat = build_strategy("data")
        src = SyntheticSource(SYN, 64, rank=dist.rank(), world_size=dist.world_size())
        trainer = Trainer(train_cfg(Path(out) / "run", steps, 64, checkpoint_every=5), {"a": make_sae()}, src,
                          strategy=strat, device=device)
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

        def maybe_die(t: Trainer) -> None:
            if first_attempt and kill_at > 0 and dist.rank() == 1 and t.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.step_hooks.append(maybe_die)
        trainer.fit()
        if dist.is_main():
            save_tensors(Path(out) / "final.safetensors", trainer.saes)
            Path(out, "attempts").write_text(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    finally:
        dist.destroy()


if __name__ == "__main__":
    elastic_main()


def e2e_live_cfg(model: str, docs: str):
    """The tiny causal LM's live stream for end-to-end (train.loss=kl) training: contexts of 16 tokens."""
    from sae.buffer.config import LiveConfig
    from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig

    return LiveConfig(model=ModelConfig(name=model, device="cpu"), text=TextConfig(name=docs, context_length=16),
                      harvest=HarvestConfig(batch_size=4, progress=False), mixing_tokens=128, heldout_contexts=4)


class UnionContexts:
    """Every rank's contexts of a step in one batch: what one process reads in their place."""

    def __init__(self, sources):
        self.sources = sources
        self.d_in, self.d_out = sources[0].d_in, sources[0].d_out

    def __iter__(self):
        from sae.train.end_to_end import TokenBatch

        for parts in zip(*self.sources):
            yield TokenBatch(*(torch.cat(ts) for ts in zip(*parts)))

    def state_dict(self):
        return [s.state_dict() for s in self.sources]

    def load_state_dict(self, state):
        for s, st in zip(self.sources, state):
            s.load_state_dict(st)


def e2e_data_parallel(rank: int, world: int, port: int, out: str, model: str, docs: str, steps: int) -> None:
    """train.loss=kl, data-parallel: each rank splices its own contexts; saves its SAE tensors."""
    from sae.train.end_to_end import ContextSource, EndToEnd

    _init(rank, world, port)
    try:
        source = ContextSource(e2e_live_cfg(model, docs), 64, hookpoint="layers.0", rank=rank, world_size=world)
        cfg = train_cfg(Path(out) / "run", steps, 64, loss="kl", eval_every=0)
        trainer = Trainer(cfg, {"a": make_sae("topk", 0, selection_dtype="float32")}, source,
                          strategy=build_strategy("data"), objective=EndToEnd(source, "kl"))
        trainer.fit()
        save_tensors(Path(out) / f"rank{rank}.safetensors", trainer.saes)
        Path(out, f"tokens{rank}").write_text(str(trainer.tokens))
    finally:
        dist.destroy()
