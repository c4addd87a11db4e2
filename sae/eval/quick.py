"""Reconstruction and sparsity metrics of an SAE over a stream of held-out batches.

Used by the trainer (the periodic held-out evaluation, :class:`PeriodicEval`, and the final
summary) and the tests; the full evaluator (``sae.runners.evaluate``: spliced model, plots, report) uses
the same accumulators and metric names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from sae.buffer.source import Batch
from sae.models import SparseCoder

from .metrics import ReconstructionStats, SparsityStats


@torch.no_grad()
def evaluate_batches(sae: SparseCoder, batches: Iterable[Batch], device: torch.device | str = "cpu",
                     dense_threshold: float = 0.1) -> dict[str, float]:
    """FVU, MSE, cosine, relative norm, L0, L1, dead and dense fractions over ``batches``.

    Dead here means never fired on these batches. The SAE is put in eval mode (BatchTopK then
    uses its threshold) and restored afterwards.
    """
    was_training = sae.training
    sae.eval()
    rec, spa = ReconstructionStats(), SparsityStats(sae.num_latents)
    try:
        for batch in batches:
            x = batch.x.to(device).float()
            y = batch.y.to(device).float() if batch.y is not None else x
            codes = sae.encode(x)
            y_hat = sae.reconstruct(x, codes)
            rec.update(y_hat, y)
            spa.update(codes)
    finally:
        sae.train(was_training)
    if rec.n_tokens == 0:
        raise ValueError("no evaluation batches: the held-out split is empty")
    return {**rec.as_dict(), **spa.as_dict(dense_threshold), "tokens": float(rec.n_tokens)}


def batches_of(batches: Sequence[Batch] | dict[str, Sequence[Batch]], name: str) -> Sequence[Batch]:
    """SAE ``name``'s held-out batches: its own entry of a per-SAE dict, else the shared list."""
    return batches[name] if isinstance(batches, dict) else batches


class PeriodicEval:
    """A trainer step hook: every ``every`` steps, score each SAE on the same held-out batches and
    log ``eval/<metric>/<sae name>`` (fvu, mse, cosine, l0, dead_fraction, ...) at that step.

    Dead fraction here counts latents silent on the held-out slice; the trainer's
    ``train/dead_fraction`` uses its token window.
    """

    def __init__(self, batches: Sequence[Batch] | dict[str, Sequence[Batch]], every: int,
                 gather: Callable[[dict[str, float]], list[dict[str, float]]] | None = None):
        """``batches``: one list for every SAE, or a list per SAE name (SAEs of different hook points).
        ``gather``: with SAEs spread across ranks, every rank scores its own and this collective
        (e.g. ``dist.all_gather_objects``) brings all figures to the rank that logs them."""
        if every <= 0:
            raise ValueError(f"train.eval_every={every} must be > 0 for a periodic evaluation")
        if not batches or (isinstance(batches, dict) and not all(batches.values())):
            raise ValueError("no held-out batches for the periodic evaluation; set train.eval_every=0 or provide "
                             "a held-out split")
        self.batches = {n: list(b) for n, b in batches.items()} if isinstance(batches, dict) else list(batches)
        self.every, self.gather = every, gather

    def __call__(self, trainer: Any) -> None:
        if trainer.step % self.every:
            return
        metrics = {f"eval/{k}/{name}": v for name, sae in trainer.saes.items()
                   for k, v in evaluate_batches(sae, batches_of(self.batches, name), trainer.device).items()}
        if self.gather is not None:
            metrics = {k: v for part in self.gather(metrics) for k, v in part.items()}
        trainer.logger.log(metrics, trainer.step)
