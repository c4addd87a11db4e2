"""Metrics against hand-computed values on small tensors (sae.eval.metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from sae.eval.metrics import ReconstructionStats, SparsityStats, histogram_quantile, log10_density_histogram
from sae.models import SparseCodes


def test_reconstruction_hand_computed():
    y = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total variance 1 + 1 = 2
    y_hat = torch.tensor([[1.0, 1.0], [2.0, 0.0]])  # squared errors 1 and 1
    m = ReconstructionStats().update(y_hat, y).as_dict()
    assert m["fvu"] == pytest.approx(1.0)
    assert m["explained_variance"] == pytest.approx(0.0)
    assert m["mse"] == pytest.approx(2 / 4)
    assert m["cosine"] == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)
    assert m["relative_norm"] == pytest.approx((math.sqrt(2) / 1 + 2 / 3) / 2)
    # A zero target has no relative norm: it is left out of that mean (and only of that one).
    z = ReconstructionStats().update(torch.cat([y_hat, torch.ones(1, 2)]), torch.cat([y, torch.zeros(1, 2)]))
    assert z.relative_norm == pytest.approx(m["relative_norm"]) and z.n_tokens == 3


def test_fvu_over_batches_equals_fvu_of_concatenation():
    gen = torch.Generator().manual_seed(0)
    ys = [torch.randn(n, 6, generator=gen) * 3 + torch.arange(6.0) * (i + 1) for i, n in enumerate((5, 17, 9))]
    y_hats = [y + 0.5 * torch.randn(y.shape, generator=gen) for y in ys]
    stats = ReconstructionStats()
    for y_hat, y in zip(y_hats, ys):
        stats.update(y_hat, y)
    whole = ReconstructionStats().update(torch.cat(y_hats), torch.cat(ys))
    y, y_hat = torch.cat(ys).double(), torch.cat(y_hats).double()
    direct = ((y_hat - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert stats.fvu == pytest.approx(direct.item(), rel=1e-12)
    assert whole.fvu == pytest.approx(direct.item(), rel=1e-12)
    for k in ("mse", "cosine", "relative_norm"):
        assert getattr(stats, k) == pytest.approx(getattr(whole, k), rel=1e-12)
    # The batches have different means, so the mean of per-batch FVUs is a different (wrong) number.
    per_batch = sum(ReconstructionStats().update(a, b).fvu for a, b in zip(y_hats, ys)) / 3
    assert abs(per_batch - stats.fvu) > 0.05 * stats.fvu


def _codes():
    # 4 tokens, 5 latents, k = 2; token 1's second slot is unused (value 0).
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3]])
    vals = torch.tensor([[1.0, 2.0], [3.0, 0.0], [1.0, 1.0], [2.0, 0.5]])
    dense = torch.zeros(4, 5).scatter_(1, idx, vals)
    return SparseCodes(vals, idx), dense


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_sparsity_on_constructed_codes(kind):
    sparse, dense = _codes()
    s = SparsityStats(5).update(sparse if kind == "sparse" else dense)
    assert s.fire_counts.tolist() == [4, 2, 0, 1, 0]
    assert s.frequencies.tolist() == [1.0, 0.5, 0.0, 0.25, 0.0]
    m = s.as_dict(dense_threshold=0.1)
    assert m["l0"] == pytest.approx(7 / 4)  # 2 + 1 + 2 + 2
    assert m["l1"] == pytest.approx((3 + 3 + 2 + 2.5) / 4)
    assert m["dead_fraction"] == pytest.approx(2 / 5)  # latents 2 (only a zero value) and 4
    assert m["dense_fraction"] == pytest.approx(3 / 5)  # latents 0, 1, 3 fire on > 10% of tokens
    assert s.as_dict(dense_threshold=0.3)["dense_fraction"] == pytest.approx(2 / 5)
    assert s.l0_counts.tolist() == [0, 1, 3, 0, 0, 0]
    assert (m["l0_p50"], m["l0_max"]) == (2.0, 2.0)
    assert s.dead_mask().tolist() == [False, False, True, False, True]


def test_dead_window_counts_tokens_since_last_fire():
    first = torch.zeros(3, 4)
    first[0, 3] = 1.0  # latent 3 fires in the first batch (3 tokens) only
    first[:, 0] = 1.0
    second = torch.zeros(2, 4)
    second[:, 0] = 1.0
    s = SparsityStats(4, dead_window_tokens=2).update(first).update(second)
    assert s.tokens_since_fired.tolist() == [0, 5, 5, 2]
    assert s.as_dict()["dead_fraction_window"] == pytest.approx(3 / 4)  # 1, 2 and 3 silent for >= 2 tokens
    assert s.as_dict()["dead_fraction"] == pytest.approx(2 / 4)  # never fired: 1 and 2
    assert SparsityStats(4, dead_window_tokens=3).update(first).update(second).as_dict()[
        "dead_fraction_window"] == pytest.approx(2 / 4)


def test_density_histogram_bins():
    freqs = torch.tensor([0.0, 1e-3, 1e-3, 0.5, 1.0, 0.02, 0.01], dtype=torch.float64)
    h = log10_density_histogram(freqs, [-4.0, -3.0, -2.0, -1.0, 0.0])
    # log10: -3, -3 -> [-3, -2); -0.30 and 0 (top edge, closed) -> [-1, 0]; -1.70 and -2 -> [-2, -1)
    assert h.counts == [0, 2, 2, 2]
    assert h.dead == 1
    d = log10_density_histogram(freqs, n_tokens=1000, bins_per_decade=1)
    assert d.edges == [-3.0, -2.0, -1.0, 0.0] and d.counts == [2, 2, 2]
    assert log10_density_histogram(torch.tensor([1e-6]), [-3.0, 0.0]).counts == [1]  # below range -> first bin


def test_histogram_quantile():
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0, 6.0])  # values 1 (10%), 2 (30%), 4 (60%)
    assert histogram_quantile(counts, 0.1) == 1
    assert histogram_quantile(counts, 0.3) == 2
    assert histogram_quantile(counts, 0.5) == 4
    assert histogram_quantile(counts, 0.4) == 2
