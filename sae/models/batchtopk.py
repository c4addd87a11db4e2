"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k * B largest activations over the whole batch, so k is an average L0 per
token. Inference must not depend on the batch: a token keeps every latent above a global
threshold estimated during training as a running average of the smallest activation kept per
batch (the paper's estimator), like a JumpReLU with one shared threshold.

Sparsity is preserved: each token first proposes its ``batch_topk_cap * k`` largest
pre-activations, and the batch-level selection runs over those [B, cap*k] candidates; the result
is exact unless a single token would take more than cap*k latents in a batch (the fraction of
tokens at the cap is reported as ``cap_hit`` in the losses dict, as a diagnostic).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import SAEConfig
from .registry import register
from .topk import TopKSAE


def batch_cut(cand_BC: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    """The training-time selection over non-negative candidates [B, C]: the mask of the k * B
    largest (ties at the cut kept), and the smallest positive value kept, the sample the inference
    threshold is estimated from (None when nothing positive is kept)."""
    n_keep = min(k * cand_BC.shape[0], cand_BC.numel())
    kth = cand_BC.flatten().topk(n_keep, sorted=False).values.min()
    keep = cand_BC >= kth
    kept_pos = cand_BC[keep & (cand_BC > 0)]
    return keep, (kept_pos.min() if kept_pos.numel() > 0 else None)


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    latent_parallel = False  # the batch-wide cut is not implemented across ranks

    def jumprelu_thresholds(self) -> Tensor:
        """The global inference threshold for every latent."""
        thr = float(self.threshold)
        if thr < 0:
            raise ValueError("this BatchTopK SAE has no inference threshold yet (it is estimated during training); "
                             "train it for at least one step before exporting")
        return torch.full((self.num_latents,), thr)

    def sparsity_rule(self) -> str:
        return (f"k = {self.k} on average per batch in training; at inference a global threshold "
                f"{float(self.threshold):.4g}")

    def __init__(self, cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
        super().__init__(cfg, d_in, d_out, seed=seed)
        if cfg.batch_topk_cap < 1:
            raise ValueError(f"sae.batch_topk_cap={cfg.batch_topk_cap} must be >= 1")
        if not 0.0 <= cfg.threshold_momentum < 1.0:
            raise ValueError(f"sae.threshold_momentum={cfg.threshold_momentum} must be in [0, 1)")
        self.num_candidates = min(self.num_latents, cfg.batch_topk_cap * cfg.k)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet
        self.last_cap_hit = 0.0

    def select(self, pre_BL: Tensor) -> tuple[Tensor, Tensor]:
        cand_vals, cand_idx = pre_BL.topk(self.num_candidates, dim=1, sorted=True)
        return self._batch_select(cand_vals, cand_idx, pre_BL.shape[1])

    def select_latents(self, x_in_BD: Tensor, scores_BL: Tensor) -> tuple[Tensor, Tensor]:
        # With approximate scores only the per-token candidates come from them: the batch-level
        # cut runs on exact values (bf16 scores tie often at the batch threshold).
        cand_vals, cand_idx = scores_BL.topk(self.num_candidates, dim=1, sorted=True)
        cand_vals = self.exact_values(x_in_BD, cand_idx, cand_vals)
        return self._batch_select(cand_vals, cand_idx, scores_BL.shape[1])

    def _batch_select(self, cand_vals: Tensor, cand_idx: Tensor, num_latents: int) -> tuple[Tensor, Tensor]:
        cand_vals = cand_vals.relu()
        if self.training:
            keep, kept_min = batch_cut(cand_vals, self.k)
            if kept_min is not None:
                self._update_threshold(kept_min)
            self.last_cap_hit = keep[:, -1].float().mean().item() if self.num_candidates < num_latents else 0.0
        else:
            thr = self.threshold.clamp_min(0.0)
            keep = cand_vals > thr
        return cand_vals * keep, cand_idx

    @torch.no_grad()
    def _update_threshold(self, batch_min: Tensor) -> None:
        if self.threshold < 0:
            self.threshold.copy_(batch_min)
        else:
            m = self.cfg.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * batch_min)
