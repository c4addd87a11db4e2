"""Toy model of superposition (Elhage et al. 2022) with known ground-truth features.

``num_features`` unit directions F in R^d; token b has non-negative coefficients c_b with
feature i active with probability p_i (``frequency``: uniform p, or Zipf-like decay from p
down), magnitudes |N(1, magnitude_std)|, plus optional Gaussian noise:
    x_b = sum_i c_bi F_i + noise
Batches are a pure function of (seed, batch index), which makes resume and rank splits exact:
rank r of w reads global batches r, r + w, r + 2w, ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .source import Batch


@dataclass
class SyntheticConfig:
    d: int = 64
    num_features: int = 256
    active_prob: float = 0.02
    frequency: str = "uniform"  # uniform | zipf
    zipf_exponent: float = 0.5
    magnitude_std: float = 0.1
    noise_std: float = 0.0
    seed: int = 0


class SyntheticSource:
    """Endless ActivationSource over the toy model; ``features`` holds the ground truth [N, d]."""

    def identity(self) -> dict[str, Any]:
        """What a resume must match (see sae.train.run_dir)."""
        return {"source": "synthetic", **dataclasses.asdict(self.cfg)}

    def __init__(self, cfg: SyntheticConfig, batch_size: int, *, rank: int = 0, world_size: int = 1):
        if cfg.d <= 0 or cfg.num_features <= 0 or batch_size <= 0:
            raise ValueError(
                f"synthetic d={cfg.d}, num_features={cfg.num_features}, batch_size={batch_size} must be > 0"
            )
        if not 0 < cfg.active_prob <= 1:
            raise ValueError(f"synthetic active_prob={cfg.active_prob} must be in (0, 1]")
        if cfg.frequency not in ("uniform", "zipf"):
            raise ValueError(f"synthetic frequency={cfg.frequency!r}; use uniform or zipf")
        self.cfg, self.batch_size = cfg, batch_size
        self.d_in = self.d_out = cfg.d
        self.rank, self.world_size = rank, world_size
        # Offset so that features never coincide with a model initialised from the same seed.
        gen = torch.Generator().manual_seed(cfg.seed * 7 + 123_456_789)
        F = torch.randn(cfg.num_features, cfg.d, generator=gen)
        self.features = F / F.norm(dim=1, keepdim=True)
        ranks = torch.arange(1, cfg.num_features + 1, dtype=torch.float32)
        if cfg.frequency == "zipf":
            self.probs = cfg.active_prob * ranks.pow(-cfg.zipf_exponent)
        else:
            self.probs = torch.full((cfg.num_features,), cfg.active_prob)
        self.next_batch = 0  # local batch counter

    def batch(self, global_index: int) -> Batch:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * global_index + 1)
        active = torch.rand(self.batch_size, cfg.num_features, generator=gen) < self.probs
        mags = (1.0 + cfg.magnitude_std * torch.randn(self.batch_size, cfg.num_features, generator=gen)).abs()
        coeffs = active * mags
        x = coeffs @ self.features
        if cfg.noise_std > 0:
            x += cfg.noise_std * torch.randn(x.shape, generator=gen)
        return Batch(x)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            b = self.batch(self.next_batch * self.world_size + self.rank)
            self.next_batch += 1
            yield b

    def state_dict(self) -> dict[str, Any]:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_batch = int(state["next_batch"])


def feature_recovery(features_ND: Tensor, W_dec_LD: Tensor) -> Tensor:
    """Mean over true features of the max cosine similarity to any decoder row."""
    F = features_ND / features_ND.norm(dim=1, keepdim=True)
    W = W_dec_LD.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (F @ W.T).max(dim=1).values.mean()
