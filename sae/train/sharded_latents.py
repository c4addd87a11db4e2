"""Latent parallelism (``train.parallel=latent``): the latents of a model split over ranks.

Each of W ranks holds latents [r L/W, (r+1) L/W) of every group (a TopK SAE has one group; a
cross-layer transcoder one per layer): its slice of the encoder (``W_enc``, ``b_enc``, a JumpReLU
``log_threshold``) and of the decoder rows; ``b_dec`` is replicated (the family's
``latent_axes``). Every rank reads the same batches. The family runs its own forward
(:meth:`sae.models.SparseCoder.forward_with`) with :class:`ShardedLatents`, which is all the
communication there is:

- selection (TopK per token, BatchTopK's per-token candidates, AuxK among dead latents): each rank
  proposes its local top-k of a group, the W*k candidates are all-gathered and the exact global
  top-k kept (Gao et al. 2024, sec. 5). Every rank then knows every selected value (a CLT's
  BatchTopK cut and its threshold are identical everywhere) and keeps the slots it owns;
- partial reconstructions (and JumpReLU's L0 term) are summed over ranks with an autograd-aware
  all-reduce whose backward hands every rank the full gradient of its own slice.

So codes, losses and each slice's gradients equal those of one process holding all latents
(tests/distributed). Shards are written per rank (``shard_RR_of_WW``);
:func:`sae.train.shards.consolidate_sae` joins them; :func:`sae.train.reshard.reshard_checkpoint` splits a
checkpoint again (weights, Adam moments, dead counters) for another world size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.models import SparseCoder
from sae.models.base import LocalLatents, Shard

from . import dist


class ShardedLatents(LocalLatents):
    """This rank's slice [offset, offset + L_r) of every group's latents."""

    local = False

    def __init__(self, shard: Shard, device: torch.device | None = None):
        self.shard, self.device = shard, device

    def topk(self, scores_BL: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
        local = scores_BL.shape[1]  # this rank's latents of the group
        lv, li = scores_BL.topk(min(k, local), dim=1, sorted=False)
        gv = dist.all_gather_stack(lv.float())  # [W, B, k_local]; bf16 selection scores travel as fp32
        gi = dist.all_gather_stack(li + self.shard.offset)
        B = gv.shape[1]
        gv, gi = gv.permute(1, 0, 2).reshape(B, -1), gi.permute(1, 0, 2).reshape(B, -1)
        top_v, pos = gv.topk(min(k, gv.shape[1]), dim=1, sorted=False)
        top_i = gi.gather(1, pos)
        own = (top_i >= self.shard.offset) & (top_i < self.shard.offset + local)
        return top_v, torch.where(own, top_i - self.shard.offset, torch.zeros_like(top_i)), own

    def reduce(self, t: Tensor) -> Tensor:
        return dist.reduce_from_parallel(t)

    def copy_in(self, t: Tensor) -> Tensor:
        return dist.copy_to_parallel(t)

    def count(self, n: int) -> int:
        # On the model's device: NCCL reduces device tensors only.
        return int(dist.all_reduce_(torch.tensor([n], dtype=torch.float64, device=self.device)).item())


def latents_of(sae: SparseCoder) -> ShardedLatents:
    """Where the latents of ``sae`` (a :meth:`~sae.models.SparseCoder.latent_shard`) live."""
    return ShardedLatents(sae.shard, sae.b_dec.device)
