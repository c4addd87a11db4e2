"""Latent parallelism for cross-layer transcoders (``train.parallel=latent`` with ``sae=clt``).

Each of W ranks holds latents [r L/W, (r+1) L/W) of *every* layer's group: its slice of ``W_enc``,
``b_enc``, ``log_threshold`` (dim 1) and of every ``W_dec[i]`` (dim 0), so the quadratic decoder is
split evenly; ``b_dec`` is replicated. Every rank reads the same batches. The model runs its own
forward (:meth:`sae.models.clt.CrossLayerTranscoder.forward_with`) with :class:`ShardedLatents`:

- selection (TopK per token, BatchTopK's per-token candidates, AuxK among dead latents): each rank
  proposes its local top-k of a group, the W*k candidates are all-gathered and the exact global
  top-k kept, as for TopK SAEs (Gao et al. 2024, sec. 5). Every rank then knows every selected
  value (BatchTopK's batch-wide cut and its threshold are identical everywhere) and keeps the
  slots it owns;
- partial reconstructions (and JumpReLU's L0 term) are summed over ranks with an autograd-aware
  all-reduce whose backward hands every rank the full gradient of its own slice.

So codes, losses and each slice's gradients equal those of one process holding all latents
(tests/distributed/test_clt_parallel.py). Shards are written per rank (``shard_RR_of_WW``);
:func:`sae.train.shards.consolidate_sae` joins them; :func:`sae.train.reshard.reshard_checkpoint` splits a checkpoint
again (weights, Adam moments, per-layer dead counters) for another world size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.models.base import Shard
from sae.models.clt import CrossLayerTranscoder, LocalLatents

from . import dist

#: CLT parameters split along the latent axis: name -> that axis (``W_dec.i`` are split on dim 0).


class ShardedLatents(LocalLatents):
    """This rank's slice [offset, offset + L_r) of every group's latents."""

    def __init__(self, shard: Shard, local_latents: int, device: torch.device | None = None):
        self.shard, self.local, self.device = shard, local_latents, device

    def topk(self, scores_BL: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
        k_local = min(k, scores_BL.shape[1])
        lv, li = scores_BL.topk(k_local, dim=1, sorted=False)
        gv = dist.all_gather_stack(lv.float())  # [W, B, k_local]
        gi = dist.all_gather_stack(li + self.shard.offset)
        B = gv.shape[1]
        gv, gi = gv.permute(1, 0, 2).reshape(B, -1), gi.permute(1, 0, 2).reshape(B, -1)
        top_v, pos = gv.topk(min(k, gv.shape[1]), dim=1, sorted=False)
        top_i = gi.gather(1, pos)
        own = (top_i >= self.shard.offset) & (top_i < self.shard.offset + self.local)
        return top_v, torch.where(own, top_i - self.shard.offset, torch.zeros_like(top_i)), own

    def reduce(self, t: Tensor) -> Tensor:
        return dist.reduce_from_parallel(t)

    def copy_in(self, t: Tensor) -> Tensor:
        return dist.copy_to_parallel(t)

    def count(self, n: int) -> int:
        # On the model's device: NCCL reduces device tensors only.
        return int(dist.all_reduce_(torch.tensor([n], dtype=torch.float64, device=self.device)).item())


def latents_of(sae: CrossLayerTranscoder) -> ShardedLatents:
    return ShardedLatents(sae.shard, sae.latents_per_layer, sae.b_enc.device)
