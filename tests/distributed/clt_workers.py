"""Process bodies for the 2-process latent-parallel CLT tests (importable by torch.multiprocessing spawn)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from workers import _init, save_tensors, train_cfg

from sae.models import SAEConfig, build_sae
from sae.train import dist
from sae.train.strategy import LatentParallel, build_strategy
from sae.train.trainer import Trainer

N, M, L, K = 3, 8, 16, 3
CASES = [("topk", False), ("topk", True), ("batchtopk", False), ("jumprelu", False)]


def make_clt(act: str = "topk", acausal: bool = False, seed: int = 0):
    cfg = SAEConfig(architecture="clt", clt_layers=N, clt_activation=act, clt_acausal=acausal, num_latents=L, k=K,
                    k_aux=4, transcode=True, batch_topk_cap=2, l0_coefficient=0.01, sparsity_warmup_steps=0,
                    normalize_decoder=True)  # unit rows: the sharded projection and AuxK's dead latents
    return build_sae(cfg, N * M, seed=seed)


def data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N * M, generator=g)
    y = torch.tanh(x @ torch.randn(N * M, N * M, generator=g) / (N * M) ** 0.5)
    return x, y


def _slice(rank: int, world: int) -> slice:
    Lr = L // world
    return slice(rank * Lr, (rank + 1) * Lr)


def forward_check(rank: int, world: int, port: int, out: str) -> None:
    """Init, forward and backward of each sharded CLT against the unsharded one on the same batch."""
    _init(rank, world, port)
    try:
        x, y = data(128)
        sl = _slice(rank, world)
        for act, acausal in CASES:
            base = make_clt(act, acausal)
            full = copy.deepcopy(base)
            full.init_from_data(x, y)
            strat = LatentParallel()
            local = strat.prepare({"a": copy.deepcopy(base)})["a"]
            strat.init_from_data(local, x, y)
            dead = torch.zeros(N, L, dtype=torch.bool)
            dead[:, ::3] = True  # AuxK active, dead latents on both shards of every group
            ref = full(x, y, dead_mask=dead.flatten())
            ref.losses["loss"].backward()
            got = strat.forward(local, x, y, dead_mask=dead[:, sl].flatten())
            got.losses["loss"].backward()
            what = f"rank {rank} {act}{' acausal' if acausal else ''}"
            checks = {"x_hat": (got.x_hat, ref.x_hat), "b_dec.grad": (local.b_dec.grad, full.b_dec.grad)}
            checks.update({f"loss {k}": (got.losses[k], ref.losses[k]) for k in ref.losses})
            for name in ("W_enc", "b_enc") + (("log_threshold",) if act == "jumprelu" else ()):
                checks[name] = (getattr(local, name), getattr(full, name)[:, sl])
                checks[f"{name}.grad"] = (getattr(local, name).grad, getattr(full, name).grad[:, sl])
            for i in range(N):
                checks[f"W_dec.{i}.grad"] = (local.W_dec[i].grad, full.W_dec[i].grad[sl])
            if act == "batchtopk":
                checks["threshold"] = (local.threshold, full.threshold)
            Lr = L // world
            if act == "jumprelu":
                mine = got.codes.detach().view(-1, N, Lr)
            else:
                dense = torch.zeros(x.shape[0], N * Lr).scatter_add_(1, got.codes.idx, got.codes.vals.detach())
                mine = dense.view(-1, N, Lr)
            codes = dist.all_gather_stack(mine.contiguous())  # [W, B, N, Lr] -> [B, N, L]
            checks["codes"] = (codes.permute(1, 2, 0, 3).reshape(-1, N * L), _dense(ref.codes, N * L))
            for name, (a, b) in checks.items():
                torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-5, msg=f"{what}: {name} differs")
        Path(out, f"ok{rank}").write_text("ok")
    finally:
        dist.destroy()


def _dense(codes, width: int) -> torch.Tensor:
    if isinstance(codes, torch.Tensor):
        return codes.detach()
    return torch.zeros(codes.idx.shape[0], width).scatter_add_(1, codes.idx, codes.vals.detach())


def train_run(rank: int, world: int, port: int, out: str, steps: int) -> None:
    """Latent-parallel training of each CLT case (rank 0 writes every step's logged losses), then a
    data-parallel one (rank 0 writes its weights)."""
    _init(rank, world, port)
    try:
        x, y = data(2048, seed=1)
        losses = {}
        for act, acausal in CASES:
            name = f"{act}{'_acausal' if acausal else ''}"
            cfg = train_cfg(Path(out) / name, steps, 128, dead_tokens_threshold=256)
            trainer = Trainer(cfg, {"clt": make_clt(act, acausal)}, (x, y), strategy=LatentParallel())
            rows = []
            trainer.step_hooks.append(lambda t, rows=rows: rows.append(t.last_metrics["train/loss/clt"]))
            trainer.fit()
            losses[name] = rows
        # Data parallel (generic): each rank reads every other batch of 128 rows, as one process would read 256.
        dp = Trainer(train_cfg(Path(out) / "data", steps, 128, dead_tokens_threshold=256),
                     {"clt": make_clt("topk")}, (x, y), strategy=build_strategy("data"))
        dp.fit()
        if rank == 0:
            Path(out, "losses.json").write_text(json.dumps(losses))
            save_tensors(Path(out) / "data.safetensors", dp.saes)
    finally:
        dist.destroy()
