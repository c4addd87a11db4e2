"""Reconstruction and sparsity metrics of an SAE over a stream of held-out batches.

Used by the trainer's final summary and the tests; the full evaluator (spliced model, plots,
report) builds on the same accumulators.
"""

from __future__ import annotations

from collections.abc import Iterable

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
