"""Reconstruction and sparsity metrics, per batch and accumulated over many batches (eval stage).

Definitions (y target, y_hat reconstruction, rows are tokens, N tokens, L latents):
    mse                 mean over tokens and dims of (y_hat - y)^2
    fvu                 sum ||y_hat - y||^2 / sum ||y - mean(y)||^2  (sums over the whole set)
    explained_variance  1 - fvu
    cosine              mean over tokens of cos(y_hat_b, y_b)
    relative_norm       mean over tokens with y_b != 0 of ||y_hat_b|| / ||y_b||  (shrinkage below 1)
    l0, l1              mean over tokens of the count / sum of absolute code values
    frequency_i         fraction of tokens on which latent i fired
    dead_fraction       latents that never fired on the tokens counted (the whole eval set)
    dead_fraction_window  latents not fired in the last ``dead_window_tokens`` tokens (Gao et al.)
    dense_fraction      latents with frequency above ``dense_threshold`` (10%)
:class:`ReconstructionStats` accumulates float64 sums so FVU over many batches equals FVU of
their concatenation (a mean of per-batch FVUs would not). Consumers: ``quick.evaluate_batches``
(trainer), ``run.run_eval`` (``sae-eval``).
"""

from __future__ import annotations

import math
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
class DensityHistogram:
    """Histogram of log10(firing frequency) over latents; dead latents (frequency 0) apart."""

    edges: list[float]
    """Bin edges in log10 units; bin i is [edges[i], edges[i+1]), the last bin includes its right edge."""
    counts: list[int]
    """Latents per bin (len(edges) - 1)."""
    dead: int
    """Latents that never fired (log10 of 0 is -inf, so they sit outside every bin)."""


def log10_density_histogram(frequencies_L: Tensor, edges: list[float] | None = None, *, n_tokens: int = 0,
                            bins_per_decade: int = 4) -> DensityHistogram:
    """Histogram of log10 feature density (the plot SAELens and Anthropic show).

    Default edges run from ``floor(log10(1 / n_tokens))`` (the rarest frequency a latent that
    fired can have) to 0 in steps of ``1 / bins_per_decade``. Frequencies below the first edge
    go to the first bin.

    Raises:
        ValueError: fewer than two edges, or no ``n_tokens`` to derive default edges from.
    """
    freq = frequencies_L.double().cpu()
    if edges is None:
        if n_tokens <= 0:
            raise ValueError("log10_density_histogram needs edges or n_tokens > 0 to place its bins")
        low = math.floor(math.log10(1.0 / n_tokens))
        edges = [low + i / bins_per_decade for i in range(-low * bins_per_decade + 1)]
    if len(edges) < 2:
        raise ValueError(f"histogram edges {edges} need at least two values")
    alive = freq[freq > 0]
    e = torch.tensor(edges, dtype=torch.float64)
    # right=True: a value equal to an edge starts the bin on its right; the top edge closes the last bin.
    idx = (torch.bucketize(alive.log10(), e, right=True) - 1).clamp(0, len(edges) - 2)
    counts = torch.bincount(idx, minlength=len(edges) - 1)
    return DensityHistogram([float(x) for x in edges], counts.tolist(), int((freq == 0).sum()))


def histogram_quantile(counts: Tensor, q: float) -> float:
    """Smallest value v with P(X <= v) >= q, for a histogram ``counts[v]`` over v = 0, 1, 2, ..."""
    total = counts.sum()
    if total <= 0:
        return float("nan")
    cdf = counts.double().cumsum(0) / total
    return float(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64) - 1e-12)[0])


@dataclass
class ReconstructionStats:
    """Streaming sums for reconstruction metrics over any number of batches.

    Sums of y are kept about a shift (the first batch's mean) so that the total variance
    ``sum ||y - c||^2 - N ||mean - c||^2`` does not lose precision to cancellation.
    """

    n_tokens: int = 0
    n_values: int = 0
    sq_err: float = 0.0
    cos_sum: float = 0.0
    norm_ratio_sum: float = 0.0
    n_nonzero: int = 0  # tokens with a non-zero target (the relative norm is undefined for the others)
    shift: Tensor | None = None
    y_sum: Tensor | None = None  # sum of (y - shift)
    y_sq_sum: float = 0.0  # sum of ||y - shift||^2
    y_hat_sq_sum: float = 0.0  # sum of ||y_hat||^2
    dot_sum: float = 0.0  # sum of <y, y_hat>

    def update(self, y_hat: Tensor, y: Tensor) -> ReconstructionStats:
        y64, yh64 = y.double(), y_hat.double()
        if self.shift is None:
            self.shift = y64.mean(0)
        c = y64 - self.shift
        self.n_tokens += y.shape[0]
        self.n_values += y.numel()
        self.sq_err += (yh64 - y64).pow(2).sum().item()
        self.cos_sum += torch.nn.functional.cosine_similarity(yh64, y64, dim=-1).sum().item()
        y_norm = y64.norm(dim=-1)
        nz = y_norm > 0
        self.norm_ratio_sum += (yh64.norm(dim=-1)[nz] / y_norm[nz]).sum().item()
        self.n_nonzero += int(nz.sum())
        s = c.sum(0)
        self.y_sum = s if self.y_sum is None else self.y_sum + s
        self.y_sq_sum += c.pow(2).sum().item()
        self.y_hat_sq_sum += yh64.pow(2).sum().item()
        self.dot_sum += (yh64 * y64).sum().item()
        return self

    @property
    def mean(self) -> Tensor:
        """[E] mean target over the tokens seen."""
        return self.shift + self.y_sum / self.n_tokens

    @property
    def total_variance(self) -> float:
        return self.y_sq_sum - (self.y_sum / self.n_tokens).pow(2).sum().item() * self.n_tokens

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
        """Mean ||y_hat|| / ||y|| over tokens with y != 0 (shrinkage below 1)."""
        return self.norm_ratio_sum / self.n_nonzero if self.n_nonzero else float("nan")

    @property
    def relative_reconstruction_bias(self) -> float:
        """``E ||y_hat||^2 / E <y, y_hat>`` (Rajamanoharan et al. 2024, eq. 10; SAEBench core): the
        scale of the best rescaling of y_hat onto y, inverted; 1 is unbiased, < 1 shrinkage."""
        return self.y_hat_sq_sum / self.dot_sum if self.dot_sum else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {
            "mse": self.mse, "fvu": self.fvu, "explained_variance": self.explained_variance,
            "cosine": self.cosine, "relative_norm": self.relative_norm,
            "relative_reconstruction_bias": self.relative_reconstruction_bias,
        }


@torch.no_grad()
def sampled_rows(total: int, sample: int = 0, seed: int = 0) -> Tensor:
    """The sorted latents the feature statistics average over: all ``total``, or ``sample`` of them
    drawn with ``seed`` (the same draw for every function that takes it)."""
    if not 0 < sample < total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:sample].sort().values


def mean_max_cosine(W_LD: Tensor, sample: int = 0, seed: int = 0, chunk: int = 1024) -> float:
    """Mean over latents of the largest cosine between a latent's row of ``W`` and any other row
    (SAEBench's feature statistics: encoder rows, decoder rows). ``sample > 0`` averages over that
    many seeded latents, each still compared with all L (cost ``sample x L x D``)."""
    W = W_LD.detach().float()
    norms = W.norm(dim=1).clamp_min(1e-12)  # as F.normalize, without a normalised copy of W
    L = W.shape[0]
    if L < 2:
        return float("nan")
    rows = sampled_rows(L, sample, seed)
    best = []
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk].to(W.device)
        sims = (W[r] @ W.T) / (norms[r][:, None] * norms[None, :])
        sims[torch.arange(r.numel(), device=W.device), r] = -2.0  # not the latent itself
        best.append(sims.max(dim=1).values)
    return float(torch.cat(best).double().mean())


@dataclass
class SparsityStats:
    """Streaming L0/L1, the L0 distribution, per-latent firing counts and recency.

    ``dead_window_tokens`` > 0 also tracks tokens since each latent last fired (at batch
    granularity, like the trainer's ``DeadLatentTracker``) for ``dead_fraction_window``.
    """

    num_latents: int
    dead_window_tokens: int = 0
    n_tokens: int = 0
    l0_sum: float = 0.0
    l1_sum: float = 0.0
    l0_counts: Tensor | None = None  # [L + 1] tokens per L0 value (the L0 distribution)
    fire_counts: Tensor | None = None  # [L] tokens on which each latent fired
    tokens_since_fired: Tensor | None = None  # [L]

    def update(self, codes: Codes) -> SparsityStats:
        l0 = l0_per_token(codes)
        n = l0.numel()
        self.n_tokens += n
        self.l0_sum += l0.double().sum().item()
        vals = codes.vals if isinstance(codes, SparseCodes) else codes
        self.l1_sum += vals.abs().sum(-1, dtype=torch.float64).sum().item()  # no float64 [B, L] copy
        counts = fired_counts(codes, self.num_latents).double().cpu()
        self.fire_counts = counts if self.fire_counts is None else self.fire_counts + counts
        hist = torch.bincount(l0.long().cpu(), minlength=self.num_latents + 1).double()
        self.l0_counts = hist if self.l0_counts is None else self.l0_counts + hist
        if self.tokens_since_fired is None:
            self.tokens_since_fired = torch.zeros(self.num_latents, dtype=torch.int64)
        self.tokens_since_fired += n
        self.tokens_since_fired[counts > 0] = 0
        return self

    @property
    def frequencies(self) -> Tensor:
        """[L] fraction of tokens on which each latent fired."""
        return self.fire_counts / max(self.n_tokens, 1)

    def dead_mask(self) -> Tensor:
        """[L] latents that never fired on the tokens seen."""
        return self.fire_counts == 0

    def dense_mask(self, dense_threshold: float = 0.1) -> Tensor:
        return self.frequencies > dense_threshold

    def density_histogram(self, bins_per_decade: int = 4) -> DensityHistogram:
        return log10_density_histogram(self.frequencies, n_tokens=self.n_tokens, bins_per_decade=bins_per_decade)

    def as_dict(self, dense_threshold: float = 0.1) -> dict[str, float]:
        if self.n_tokens == 0:
            raise ValueError("SparsityStats saw no tokens; evaluate at least one batch first")
        out = {
            "l0": self.l0_sum / self.n_tokens,
            "l1": self.l1_sum / self.n_tokens,
            "l0_p50": histogram_quantile(self.l0_counts, 0.5),
            "l0_p90": histogram_quantile(self.l0_counts, 0.9),
            "l0_max": float(self.l0_counts.nonzero().max()),
            "dead_fraction": dead_fraction(self.fire_counts),
            "dense_fraction": dense_fraction(self.fire_counts, self.n_tokens, dense_threshold),
        }
        if self.dead_window_tokens > 0:
            out["dead_fraction_window"] = (self.tokens_since_fired >= self.dead_window_tokens).float().mean().item()
        return out
