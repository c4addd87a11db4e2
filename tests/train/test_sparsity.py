"""The target-L0 controller of the sparsity penalty (sae/train/sparsity.py)."""

from __future__ import annotations

import math

import pytest

from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
from sae.models import SAEConfig, build_sae
from sae.train.config import TrainConfig
from sae.train.sparsity import MAX_LOG_MULTIPLIER, SparsityController
from sae.train.trainer import Trainer


def test_without_a_target_it_is_the_linear_warm_up():
    c = SparsityController(0.0, 100)
    assert not c.active and not c.wants_l0(9)
    assert [c.scale(s) for s in (0, 49, 99, 500)] == [0.01, 0.5, 1.0, 1.0]
    assert SparsityController(0.0, 0).scale(0) == 1.0


def test_it_raises_the_coefficient_while_l0_is_above_the_target_and_lowers_it_below():
    c = SparsityController(20.0, 1000, horizon=0.0)  # the trend's damping: next test
    assert c.active and c.scale(0) == 1.0  # no linear warm-up: the configured coefficient
    assert [s for s in range(40) if c.wants_l0(s)] == [9, 19, 29, 39]
    c.observe(400.0)
    assert c.scale(10) == pytest.approx(math.exp(0.5))  # a step at most e^0.5
    before = c.log_multiplier
    c.observe(21.0)
    assert c.log_multiplier - before == pytest.approx(0.5 * math.log(22 / 21))  # proportional near the target
    before = c.log_multiplier
    c.observe(5.0)
    assert c.log_multiplier < before
    c.observe(float("nan"))  # a bad reading is ignored
    for _ in range(100):
        c.observe(1e6)
    assert c.log_multiplier == MAX_LOG_MULTIPLIER  # bounded: an unreachable target does not wind it up


def test_a_falling_l0_stops_the_coefficient_rising_before_it_reaches_the_target():
    plain, damped = SparsityController(20.0, 0, horizon=0.0), SparsityController(20.0, 0)
    for l0 in (200.0, 100.0, 50.0, 30.0):  # above the target, halving every reading
        plain.observe(l0)
        damped.observe(l0)
    assert plain.log_multiplier > 1.0  # kept rising all the way
    assert damped.log_multiplier < plain.log_multiplier - 1.0 and damped.log_multiplier < 0.6


def test_the_target_anneals_from_the_first_reading_over_half_the_run():
    c = SparsityController(9.0, 0, total_steps=100)
    assert c.log_target(0) == math.log(10)  # nothing read yet
    c.observe(999.0, 9)
    assert c.log_target(9) == pytest.approx(math.log(10) + (math.log(1000) - math.log(10)) * 0.8)
    assert c.log_target(24) == pytest.approx(math.log(100))  # halfway down, geometrically
    assert c.log_target(49) == c.log_target(99) == math.log(10)
    assert SparsityController(9.0, 0, total_steps=100, anneal=0.0).log_target(9) == math.log(10)


def test_state_round_trips_and_refuses_another_target():
    a = SparsityController(20.0, 0)
    a.observe(100.0)
    b = SparsityController(20.0, 0)
    b.load_state_dict(a.state_dict())
    assert b.scale(5) == a.scale(5) != 1.0
    with pytest.raises(ValueError, match="sae.target_l0=20.0.*asks for 30.0"):
        SparsityController(30.0, 0).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="sae.target_l0=-1"):
        SparsityController(-1.0, 0)


def test_the_default_target_is_k_for_transcoders_of_penalised_families_only():
    def target(arch, **kw):
        return build_sae(SAEConfig(architecture=arch, num_latents=64, k=6, **kw), 8, 8).target_l0

    assert target("relu", transcode=True) == target("gated", transcode=True) == target("jumprelu", transcode=True) == 6
    assert target("relu") == target("jumprelu") == 0  # SAEs keep a fixed coefficient
    assert target("topk", transcode=True) == 0  # no penalty to steer
    assert target("relu", target_l0=12.0) == 12 and target("relu", transcode=True, target_l0=0.0) == 0
    def clt(activation="jumprelu", **kw):
        return build_sae(SAEConfig(architecture="clt", clt_layers=2, clt_activation=activation, num_latents=32, k=3,
                                   **kw), 16)

    assert clt(transcode=True).target_l0 == 6 and clt(transcode=True, target_l0=4.0).target_l0 == 4  # k per layer
    assert clt(transcode=False).target_l0 == 0 and clt("topk", transcode=True).target_l0 == 0  # crosscoder; TopK


@pytest.mark.parametrize("arch", ["relu", "gated", "jumprelu"])
def test_training_lands_near_the_target(arch, tmp_path):
    """On synthetic data whose fixed default coefficient lands far from 10, the controller lands near it."""
    src = SyntheticSource(SyntheticConfig(d=32, num_features=128, active_prob=0.1), 512)
    sae = build_sae(SAEConfig(architecture=arch, num_latents=256, k=10, target_l0=10.0, sparsity_warmup_steps=100), 32,
                    seed=0)
    cfg = TrainConfig(batch_size=512, steps=300, lr=3e-3, lr_warmup_steps=10, progress=False, log_every=10,
                      out_dir=str(tmp_path), eval_every=0, final_report=False)
    trainer = Trainer(cfg, {arch: sae}, src)
    last = trainer.fit()
    l0, scale = last[f"train/l0/{arch}"], last[f"train/sparsity_scale/{arch}"]
    print(f"{arch}: L0 {l0:.1f} (target 10), coefficient x{scale:.3g}, FVU {last[f'train/fvu/{arch}']:.3f}")
    # ReLU undershoots here (L0 ~3): its latents fall silent faster than the controller backs off.
    assert (2.5 if arch == "relu" else 5) <= l0 <= 20, (l0, scale)


def test_the_model_card_names_the_target_not_only_the_starting_coefficient():
    def rule(**kw):  # the card's sparsity line (sae.export.card) is the family's
        return build_sae(SAEConfig(architecture="relu", num_latents=64, k=6, **kw), 8, 8).sparsity_rule()

    assert rule() == "L1 penalty (coefficient 5)"
    assert rule(transcode=True) == "L1 penalty (starting coefficient 1, steered in training to L0 6)"


def test_the_dead_window_is_2_percent_of_the_run_for_ghost_grads_else_10m(tmp_path):
    """train.dead_tokens_threshold=null: ghost grads (ReLU and Gated transcoders) start within a short
    run (a 10M-token window never closes in a run of a few million tokens); AuxK keeps 10M."""
    from sae.train.dead import resolve_dead_threshold

    assert resolve_dead_threshold(None, 300 * 4096, 0.02) == 24576
    assert resolve_dead_threshold(None, 10**10, 0.02) == 10_000_000 and resolve_dead_threshold(None, 10, 0.02) == 1
    assert resolve_dead_threshold(None, 300 * 4096) == 10_000_000 and resolve_dead_threshold(5000, 10**10, 0.02) == 5000
    src = SyntheticSource(SyntheticConfig(d=16, num_features=32), 256)
    for arch, transcode, given, want in (("relu", True, None, 300 * 256 // 50), ("gated", True, None, 300 * 256 // 50),
                                         ("relu", False, None, 10_000_000), ("topk", True, None, 10_000_000),
                                         ("relu", True, 777, 777)):
        sae = build_sae(SAEConfig(architecture=arch, num_latents=64, k=4, transcode=transcode), 16, 16, seed=0)
        cfg = TrainConfig(batch_size=256, steps=300, out_dir=str(tmp_path), dead_tokens_threshold=given)
        assert Trainer(cfg, {arch: sae}, src).trackers[arch].threshold_tokens == want, (arch, transcode, given)
