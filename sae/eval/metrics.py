"""Reconstruction and sparsity metrics, per batch and accumulated over many batches.

Definitions (y target, y_hat reconstruction, rows are tokens):
    mse                 mean over tokens and dims of (y_hat - y)^2
    fvu                 sum ||y_hat - y||^2 / sum ||y - mean(y)||^2  (mean over the whole set)
    explained_variance  1 - fvu
    cosine              mean over tokens of cos(y_hat_b, y_b)
    l0, l1              mean over tokens of the count / sum of absolute code values
    dead_fraction       latents that never fired (in the window counted)
    dense_fraction      latents firing on more than ``dense_threshold`` of tokens (10%)
:class:`ReconstructionStats` accumulates sums in float64 so FVU over many batches equals FVU of
their concatenation (a mean of per-batch FVUs would not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae.models import Codes, SparseCodes, fired_counts, l0_per_token


def mse(y_hat: Tensor, y: Tensor) -> float:
    return (y_hat.float() - y.float()).pow(2).mean().item()


def fvu(y_hat: Tensor, y: Tensor) -> float:
    return ReconstructionStats().update(y_hat, y).fvu


def cosine_similarity(y_hat: Tensor, y: Tensor) -> float:
    return torch.nn.functional.cosine_similarity(y_hat.float(), y.float(), dim=-1).mean().item()


def l1(codes: Codes) -> float:
    vals = codes.vals if isinstance(codes, SparseCodes) else codes
    return vals.abs().sum(-1).float().mean().item()


def dead_fraction(fire_counts_L: Tensor) -> float:
    return (fire_counts_L == 0).float().mean().item()


def dense_fraction(fire_counts_L: Tensor, num_tokens: int, dense_threshold: float = 0.1) -> float:
    return (fire_counts_L / max(num_tokens, 1) > dense_threshold).float().mean().item()


@dataclass
class ReconstructionStats:
    """Streaming sums for reconstruction metrics over any number of batches."""

    n_tokens: int = 0
    n_values: int = 0
    sq_err: float = 0.0
    cos_sum: float = 0.0
    norm_ratio_sum: float = 0.0
    y_sum: Tensor | None = None
    y_sq_sum: float = 0.0

    def update(self, y_hat: Tensor, y: Tensor) -> ReconstructionStats:
        y64, d64 = y.double(), (y_hat.double() - y.double())
        self.n_tokens += y.shape[0]
        self.n_values += y.numel()
        self.sq_err += d64.pow(2).sum().item()
        self.cos_sum += torch.nn.functional.cosine_similarity(y_hat.double(), y64, dim=-1).sum().item()
        self.norm_ratio_sum += (y_hat.double().norm(dim=-1) / y64.norm(dim=-1).clamp_min(1e-12)).sum().item()
        s = y64.sum(0)
        self.y_sum = s if self.y_sum is None else self.y_sum + s
        self.y_sq_sum += y64.pow(2).sum().item()
        return self

    @property
    def total_variance(self) -> float:
        # sum ||y - mean||^2 = sum ||y||^2 - N ||mean||^2
        mean = self.y_sum / self.n_tokens
        return self.y_sq_sum - self.n_tokens * mean.pow(2).sum().item()

    @property
    def fvu(self) -> float:
        return self.sq_err / max(self.total_variance, 1e-300)

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu

    @property
    def mse(self) -> float:
        return self.sq_err / max(self.n_values, 1)

    @property
    def cosine(self) -> float:
        return self.cos_sum / max(self.n_tokens, 1)

    @property
    def relative_norm(self) -> float:
        """Mean ||y_hat|| / ||y|| (shrinkage below 1)."""
        return self.norm_ratio_sum / max(self.n_tokens, 1)

    def as_dict(self) -> dict[str, float]:
        return {
            "mse": self.mse, "fvu": self.fvu, "explained_variance": self.explained_variance,
            "cosine": self.cosine, "relative_norm": self.relative_norm,
        }


@dataclass
class SparsityStats:
    """Streaming L0/L1 and per-latent firing counts."""

    num_latents: int
    n_tokens: int = 0
    l0_sum: float = 0.0
    l1_sum: float = 0.0
    l0_counts: Tensor | None = None  # [L + 1] tokens per L0 value (the L0 distribution)
    fire_counts: Tensor | None = None

    def update(self, codes: Codes) -> SparsityStats:
        l0 = l0_per_token(codes)
        self.n_tokens += l0.numel()
        self.l0_sum += l0.sum().item()
        vals = codes.vals if isinstance(codes, SparseCodes) else codes
        self.l1_sum += vals.abs().sum().item()
        counts = fired_counts(codes, self.num_latents).cpu()
        self.fire_counts = counts if self.fire_counts is None else self.fire_counts + counts
        hist = torch.bincount(l0.long().cpu(), minlength=self.num_latents + 1).double()
        self.l0_counts = hist if self.l0_counts is None else self.l0_counts + hist
        return self

    @property
    def frequencies(self) -> Tensor:
        return self.fire_counts / max(self.n_tokens, 1)

    def as_dict(self, dense_threshold: float = 0.1) -> dict[str, float]:
        return {
            "l0": self.l0_sum / max(self.n_tokens, 1),
            "l1": self.l1_sum / max(self.n_tokens, 1),
            "dead_fraction": dead_fraction(self.fire_counts),
            "dense_fraction": dense_fraction(self.fire_counts, self.n_tokens, dense_threshold),
        }
