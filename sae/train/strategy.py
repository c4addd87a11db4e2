"""Parallel training strategies, applied by functions; models stay rank-agnostic.

- :class:`SingleProcess`: no communication.
- :class:`DataParallel`: SAEs replicated; each rank reads its own shards; gradients averaged
  with one bucketed all-reduce per SAE; the FVU denominator is the variance over the union of
  all ranks' batches, so the averaged gradient equals the single-process gradient on the union
  (not only in expectation); dead-latent counters see the firing counts of every rank.
- :class:`LatentParallel` (Gao et al. 2024, sec. 5): the latents sharded over ranks; each rank
  computes its local pre-activations and local top-k, the W*k candidates are gathered and the
  exact global top-k selected; partial reconstructions are summed across ranks. Every rank reads
  the same batches. The families that declare ``latent_parallel`` (TopK SAEs, cross-layer
  transcoders) run their own forward against :mod:`sae.train.sharded_latents`.
- :class:`SAEParallel` ("hook-point parallel"): each SAE lives on one rank (round-robin over the
  names of hook points or sweep variants); no communication during training.

All communication goes through :mod:`sae.train.dist`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from sae.models import ForwardOutput, SparseCoder, VarianceFn, fired_counts, l0_per_token

from . import dist
from .sharded_latents import latents_of

STRATEGIES = ("none", "data", "latent", "sae")


@torch.no_grad()
def global_token_variance(y_BE: Tensor) -> Tensor:
    """Variance per token about the mean of the union of all ranks' batches (equal batch sizes).

    Returns var_union / W * (W B) / B ... i.e. the union's total variance per token; with the FVU
    of :func:`sae.models.fvu` each rank's loss is err_r / (B v) and the rank-average of gradients
    equals the gradient of sum_r err_r / (W B v), the FVU of the union.
    """
    y = y_BE.double()
    stats = torch.cat([y.sum(0), y.pow(2).sum().reshape(1), torch.tensor([y.shape[0]], dtype=y.dtype,
                                                                         device=y.device)])
    dist.all_reduce_(stats)
    n = stats[-1]
    s1, s2 = stats[:-2], stats[-2]
    return ((s2 - s1.pow(2).sum() / n) / n).float()


class SingleProcess:
    name = "none"
    #: FVU denominator statistic (None: per batch, :func:`sae.models.token_variance`).
    variance_fn: VarianceFn | None = None

    def data_split(self) -> tuple[int, int]:
        """(rank, world size) for splitting the activation source."""
        return 0, 1

    def prepare(self, saes: dict[str, SparseCoder]) -> dict[str, SparseCoder]:
        return saes

    def full_num_latents(self, sae: SparseCoder) -> int:
        return sae.num_latents

    def init_from_data(self, sae: SparseCoder, x: Tensor, y: Tensor | None) -> None:
        sae.init_from_data(x, y)

    def gather_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The step's metrics of every SAE, for the logging rank (SAEs on other ranks included)."""
        return metrics

    def forward(self, sae: SparseCoder, x: Tensor, y: Tensor | None, **kw: Any) -> ForwardOutput:
        return sae(x, y, **kw)

    def after_backward(self, sae: SparseCoder) -> None:
        pass

    def clip_grad_norm_(self, sae: SparseCoder, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)

    def step_dead_mask(self, tracker) -> Tensor | None:
        """The dead mask a step passes to AuxK: None while the tracker's host-side bound rules out
        dead latents (no host sync); the same decision on every rank."""
        return tracker.dead_mask_if_any()

    def grad_sq_total(self, sae: SparseCoder):
        """For the fused optimiser step: per-parameter squared gradient norms -> the global one."""
        return None  # their sum

    def fired_counts(self, sae: SparseCoder, out: ForwardOutput) -> Tensor:
        return fired_counts(out.codes, sae.num_latents)

    def tokens_per_step(self, batch_tokens: int) -> int:
        return batch_tokens

    def after_step(self, sae: SparseCoder) -> None:
        pass

    def mean_l0(self, out: ForwardOutput) -> float:
        return l0_per_token(out.codes).mean().item()

    def dead_fraction(self, dead_mask: Tensor) -> float:
        return dead_mask.float().mean().item()

    def writes_sae(self, name: str) -> bool:
        """Whether this rank writes ``name``'s weights into checkpoints."""
        return dist.is_main()

    def shard_meta(self, sae: SparseCoder) -> dict[str, Any]:
        return {}


class DataParallel(SingleProcess):
    name = "data"
    variance_fn = staticmethod(global_token_variance)

    def data_split(self) -> tuple[int, int]:
        return dist.rank(), dist.world_size()

    def prepare(self, saes: dict[str, SparseCoder]) -> dict[str, SparseCoder]:
        for sae in saes.values():  # identical start whatever each rank's seed did
            for t in list(sae.parameters()) + list(sae.buffers()):
                dist.broadcast_(t.data)
        return saes

    def init_from_data(self, sae: SparseCoder, x: Tensor, y: Tensor | None) -> None:
        # The union of every rank's sample, so the init equals one process reading all of it (the
        # ranks' row counts differ in end-to-end training: the kept positions of their contexts).
        xs = dist.all_gather_rows(x)
        ys = dist.all_gather_rows(y) if y is not None else None
        sae.init_from_data(xs, ys)

    def forward(self, sae: SparseCoder, x: Tensor, y: Tensor | None, **kw: Any) -> ForwardOutput:
        kw.setdefault("variance_fn", self.variance_fn)
        return sae(x, y, **kw)

    def after_backward(self, sae: SparseCoder) -> None:
        params = [p for p in sae.parameters() if p.grad is not None]
        if not params or dist.world_size() == 1:
            return
        bucket = _flatten_dense_tensors([p.grad for p in params])
        dist.all_reduce_(bucket, "avg")
        for p, g in zip(params, _unflatten_dense_tensors(bucket, [p.grad for p in params])):
            p.grad.copy_(g)

    def fired_counts(self, sae: SparseCoder, out: ForwardOutput) -> Tensor:
        return dist.all_reduce_(fired_counts(out.codes, sae.num_latents))

    def tokens_per_step(self, batch_tokens: int) -> int:
        return batch_tokens * dist.world_size()

    def after_step(self, sae: SparseCoder) -> None:
        for b in sae.buffers():  # e.g. the BatchTopK threshold estimate: keep ranks identical
            if b.is_floating_point():
                dist.all_reduce_(b.data, "avg")

    def mean_l0(self, out: ForwardOutput) -> float:
        t = l0_per_token(out.codes).mean().reshape(1)
        return dist.all_reduce_(t, "avg").item()


class LatentParallel(SingleProcess):
    name = "latent"

    def prepare(self, saes: dict[str, SparseCoder]) -> dict[str, SparseCoder]:
        out = {}
        for name, sae in saes.items():
            if not sae.latent_parallel:
                raise ValueError(f"latent parallelism supports the topk and clt architectures, not "
                                 f"{sae.architecture!r}")
            out[name] = sae.latent_shard(dist.rank(), dist.world_size())
        return out

    @torch.no_grad()
    def init_from_data(self, sae: SparseCoder, x: Tensor, y: Tensor | None) -> None:
        sae.init_from_data_with(latents_of(sae), x, y)  # every rank holds the same batch

    def full_num_latents(self, sae: SparseCoder) -> int:
        return sae.shard.full_num_latents

    def shard_meta(self, sae: SparseCoder) -> dict[str, Any]:
        return {"shard": dataclasses.asdict(sae.shard)}

    def writes_sae(self, name: str) -> bool:
        return True

    def forward(self, sae: SparseCoder, x: Tensor, y: Tensor | None, *, dead_mask: Tensor | None = None,
                sparsity_scale: float = 1.0, variance_fn: VarianceFn | None = None) -> ForwardOutput:
        return sae.forward_with(latents_of(sae), x, y, dead_mask=dead_mask, sparsity_scale=sparsity_scale,
                                variance_fn=variance_fn)

    def step_dead_mask(self, tracker) -> Tensor | None:
        return tracker.dead_mask  # ranks' local bounds differ; AuxK agrees on the count itself

    @staticmethod
    def sharded_params(sae: SparseCoder) -> list[Tensor]:
        """The parameters each rank holds a slice of (their gradients' norms add over ranks)."""
        axes = sae.latent_axes()
        return [p for n, p in sae.named_parameters() if axes.get(n) is not None]

    def grad_sq_total(self, sae: SparseCoder):
        sharded = self.sharded_params(sae)

        def total(parts: dict[Tensor, Tensor]) -> Tensor:
            zero = torch.zeros((), device=sae.W_enc.device)
            local = sum((v for p, v in parts.items() if any(p is q for q in sharded)), zero)
            rest = sum((v for p, v in parts.items() if all(p is not q for q in sharded)), zero)
            return dist.all_reduce_(local.float().reshape(1).clone())[0] + rest

        return total

    def clip_grad_norm_(self, sae: SparseCoder, max_norm: float) -> None:
        sharded = self.sharded_params(sae)
        local = sum(p.grad.float().pow(2).sum() for p in sharded if p.grad is not None)
        total = dist.all_reduce_(torch.as_tensor(local, dtype=torch.float32).reshape(1).clone())
        replicated = [p for p in sae.parameters() if all(p is not q for q in sharded) and p.grad is not None]
        total = total + sum(p.grad.float().pow(2).sum() for p in replicated)
        norm = total.sqrt().item()
        if norm > max_norm:
            for p in sae.parameters():
                if p.grad is not None:
                    p.grad.mul_(max_norm / (norm + 1e-6))

    def mean_l0(self, out: ForwardOutput) -> float:
        t = l0_per_token(out.codes).mean().reshape(1)
        return dist.all_reduce_(t).item()

    def dead_fraction(self, dead_mask: Tensor) -> float:
        return dist.all_reduce_(dead_mask.float().mean().reshape(1), "avg").item()


class SAEParallel(SingleProcess):
    """Each SAE lives on one rank: names are dealt round-robin in sorted order."""

    name = "sae"

    def owner(self, names: list[str], name: str) -> int:
        return sorted(names).index(name) % dist.world_size()

    def prepare(self, saes: dict[str, SparseCoder]) -> dict[str, SparseCoder]:
        names = list(saes)
        mine = {n: s for n, s in saes.items() if self.owner(names, n) == dist.rank()}
        if not mine:
            raise ValueError(f"rank {dist.rank()} of {dist.world_size()} owns none of the SAEs {sorted(names)}; "
                             "launch at most as many processes as SAEs")
        return mine

    def writes_sae(self, name: str) -> bool:
        return True

    def gather_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {k: v for part in dist.all_gather_objects(metrics) for k, v in part.items()}


def build_strategy(name: str) -> SingleProcess:
    table = {"none": SingleProcess, "data": DataParallel, "latent": LatentParallel, "sae": SAEParallel}
    if name not in table:
        raise ValueError(f"train.parallel={name!r}; use one of {', '.join(STRATEGIES)}")
    return table[name]()
