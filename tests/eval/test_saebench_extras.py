"""SAEBench's core extras against hand computations: relative reconstruction bias, the mean max
cosine between encoder rows and between decoder rows, and the normalized KL score; and that a
report carries them."""

from __future__ import annotations

import math

import pytest
import torch

from sae.eval.metrics import ReconstructionStats, mean_max_cosine
from sae.eval.splice import _CausalScores


def test_relative_reconstruction_bias_by_hand():
    # ||y_hat||^2 summed: 0.25 + 1 + 9 = 10.25; <y, y_hat> summed: 0.5 + 2 + 9 = 11.5 (two batches).
    stats = ReconstructionStats()
    stats.update(torch.tensor([[0.5, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    stats.update(torch.tensor([[3.0, 0.0]]), torch.tensor([[3.0, 1.0]]))
    assert stats.relative_reconstruction_bias == pytest.approx(10.25 / 11.5)
    assert stats.as_dict()["relative_reconstruction_bias"] == pytest.approx(0.891304, abs=1e-6)


def test_mean_max_cosine_by_hand():
    W = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [1.0, 1.0, 0], [0, 0, 5.0]])
    # Row maxima: 1/sqrt2 (with row 3), 1/sqrt2, 1/sqrt2 (with rows 1 and 2), 0 (orthogonal to all).
    assert mean_max_cosine(W) == pytest.approx(3 / math.sqrt(2) / 4)
    assert mean_max_cosine(W, chunk=1) == pytest.approx(3 / math.sqrt(2) / 4)  # chunking changes nothing
    rows = torch.randperm(4, generator=torch.Generator().manual_seed(5))[:2].sort().values
    expected = sum(0.0 if int(r) == 3 else 1 / math.sqrt(2) for r in rows) / 2
    assert mean_max_cosine(W, sample=2, seed=5) == pytest.approx(expected)
    assert mean_max_cosine(torch.tensor([[1.0, 0, 0], [2.0, 0, 0]])) == pytest.approx(1.0)  # duplicates


def test_kl_score_by_hand():
    s = _CausalScores()
    s.ce = {"clean": 2.0, "sae": 3.0, "zero": 6.0, "mean": 5.0}
    s.kl = {"sae": 0.5, "zero": 2.0, "mean": 1.5}
    s.n_ce, s.n_kl = 1, 1
    out = s.result()
    assert out["kl_div_score"] == pytest.approx((2.0 - 0.5) / 2.0)
    assert out["ce_loss_recovered"] == pytest.approx((6.0 - 3.0) / (6.0 - 2.0))


def test_report_carries_the_extras(tmp_path, tiny_gpt2):
    from sae.runners.config import compose_train_config
    from sae.runners.train import run_training

    result = run_training(compose_train_config([
        "data=live", f"data.live.model.name={tiny_gpt2}", "data.live.text.context_length=32",
        "data.hookpoint=layers.0", "data.live.heldout_contexts=16", "train=smoke", "train.steps=6",
        "train.batch_size=128", "train.progress=false", "sae.k=4", "sae.expansion_factor=2",
        "train.final_report=true", f"train.out_dir={tmp_path / 'run'}"]))
    (report,) = result.reports.values()
    m, sp = report.report["metrics"], report.report["splice"]["metrics"]
    assert 0 < m["relative_reconstruction_bias"] < 2
    assert -1 <= m["encoder_mean_max_cosine"] <= 1 and -1 <= m["decoder_mean_max_cosine"] <= 1
    assert sp["kl_div_score"] == pytest.approx((sp["kl_div_zero"] - sp["kl_div_sae"]) / sp["kl_div_zero"])
    html = report.report_html.read_text()
    assert "relative reconstruction bias" in html and "KL score" in html and "mean max cosine" in html
