"""Every architecture (and its transcoder/skip-transcoder form) trains on ground-truth data."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae.buffer.source import Batch
from sae.buffer.synthetic import SyntheticConfig, SyntheticSource, feature_recovery
from sae.eval.quick import evaluate_batches
from sae.models import SAEConfig, SparseCodes, architectures, build_sae
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer

ARCHS = ["topk", "batchtopk", "relu", "jumprelu"]
# Trained on ground truth in tests/models/test_matryoshka_gated.py (feature recovery).
NEWER_ARCHS = ["gated", "matryoshka_topk", "matryoshka_batchtopk"]
TRANSCODER_ARCHS = [*ARCHS, "gated"]
D, N_FEATURES, LATENTS = 32, 128, 256
# Per-family settings that train well in a few hundred small steps: fixed, warmed-up coefficients
# (target_l0=0; transcoders would otherwise steer L0 to k, tests/train/test_sparsity.py).
SAE_KW = {
    "topk": dict(k=8),
    "batchtopk": dict(k=8),
    "relu": dict(l1_coefficient=2.0, sparsity_warmup_steps=50, target_l0=0.0),
    "jumprelu": dict(k=8, l0_coefficient=0.0005, sparsity_warmup_steps=50, target_l0=0.0),
    "gated": dict(l1_coefficient=3.0, sparsity_warmup_steps=50, target_l0=0.0),
}


def synthetic(batch_size: int = 512, active_prob: float = 0.03) -> SyntheticSource:
    return SyntheticSource(SyntheticConfig(d=D, num_features=N_FEATURES, active_prob=active_prob), batch_size)


def train(sae, source, tmp_path, steps: int = 300, lr: float = 3e-3, **kw) -> Trainer:
    cfg = TrainConfig(batch_size=source.batch_size, steps=steps, lr=lr, lr_warmup_steps=10, progress=False,
                      log_every=50, dead_tokens_threshold=20_000, out_dir=str(tmp_path / "run"), resume=False, **kw)
    trainer = Trainer(cfg, {"sae": sae}, source)
    trainer.fit()
    return trainer


def test_registry_lists_every_family():
    # clt: several layers at once (tests/models/test_clt.py)
    assert sorted(set(architectures()) - {"clt"}) == sorted(ARCHS + NEWER_ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_family_trains_and_improves_fvu(arch, tmp_path):
    src = synthetic()
    heldout = [src.batch(10**6 + i) for i in range(2)]
    sae = build_sae(SAEConfig(architecture=arch, num_latents=LATENTS, **SAE_KW[arch]), D, seed=1)
    sae.init_from_data(heldout[0].x)  # same data-dependent init the trainer applies
    before = evaluate_batches(sae, heldout)["fvu"]
    train(sae, src, tmp_path)
    after = evaluate_batches(sae, heldout)
    print(f"{arch}: fvu {before:.3f} -> {after['fvu']:.3f}, l0 {after['l0']:.1f}")
    assert after["fvu"] < 0.35, after
    assert after["fvu"] < 0.5 * before
    assert 0 < after["l0"] < 40


def test_topk_recovers_ground_truth_features(tmp_path):
    src = synthetic(active_prob=0.02)  # ~2.6 of 128 features per token: an easy setting
    sae = build_sae(SAEConfig(architecture="topk", num_latents=LATENTS, k=8), D, seed=1)
    untrained = feature_recovery(src.features, sae.W_dec).item()
    train(sae, src, tmp_path, steps=300, lr=1e-2)
    recovered = feature_recovery(src.features, sae.W_dec).item()
    fvu = evaluate_batches(sae, [src.batch(10**6)])["fvu"]
    print(f"feature recovery: untrained {untrained:.3f}, trained {recovered:.3f}; held-out fvu {fvu:.3f}")
    assert untrained < 0.9  # the criterion fails for an untrained SAE
    assert recovered >= 0.9
    assert fvu < 0.2


def _transcode_source(batch_size=512, d_out=24):
    """Target y = A x for a fixed random A: a transcoder must learn the map through sparse codes."""
    base = synthetic(batch_size)
    A = torch.randn(d_out, D, generator=torch.Generator().manual_seed(3)) / D**0.5

    class Src:
        d_in, d_out = D, A.shape[0]

        def __init__(self):
            self.inner = base
            self.batch_size = batch_size

        def batch(self, i):
            x = base.batch(i).x
            return Batch(x, x @ A.T)

        def __iter__(self):
            for b in base:
                yield Batch(b.x, b.x @ A.T)

        def state_dict(self):
            return base.state_dict()

        def load_state_dict(self, s):
            base.load_state_dict(s)

    return Src()


@pytest.mark.parametrize("arch", TRANSCODER_ARCHS)
@pytest.mark.parametrize("skip", [False, True])
def test_transcoders_train(arch, skip, tmp_path):
    src = _transcode_source()
    cfg = SAEConfig(architecture=arch, num_latents=LATENTS, transcode=True, skip_connection=skip, **SAE_KW[arch])
    sae = build_sae(cfg, src.d_in, src.d_out, seed=2)
    assert (sae.W_skip is not None) == skip
    heldout = [src.batch(10**6)]
    sae.init_from_data(heldout[0].x, heldout[0].y)
    before = evaluate_batches(sae, heldout)["fvu"]
    train(sae, src, tmp_path, steps=150)
    after = evaluate_batches(sae, heldout)["fvu"]
    print(f"{arch} transcoder skip={skip}: fvu {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before and after < 0.5
    if skip:
        assert sae.W_skip.abs().sum() > 0  # the skip path learned something


def test_batchtopk_inference_does_not_depend_on_batch(tmp_path):
    src = synthetic()
    sae = build_sae(SAEConfig(architecture="batchtopk", num_latents=LATENTS, k=8), D, seed=1)
    train(sae, src, tmp_path, steps=100)
    assert sae.threshold > 0
    sae.eval()
    x = src.batch(10**6).x[:64]
    full = sae.encode(x)
    for i in (0, 17, 63):
        single = sae.encode(x[i : i + 1])
        dense_full = torch.zeros(LATENTS).index_add_(0, full.idx[i], full.vals[i])
        dense_one = torch.zeros(LATENTS).index_add_(0, single.idx[0], single.vals[0])
        torch.testing.assert_close(dense_full, dense_one)


def test_batchtopk_training_keeps_k_per_token_on_average():
    sae = build_sae(SAEConfig(architecture="batchtopk", num_latents=LATENTS, k=8), D, seed=1)
    codes = sae(torch.randn(128, D)).codes
    assert isinstance(codes, SparseCodes)
    assert (codes.vals > 0).sum().item() <= 8 * 128
    assert (codes.vals > 0).sum().item() >= 8 * 128 - 8  # ties at zero aside


def test_topk_codes_are_sparse_and_exact():
    sae = build_sae(SAEConfig(architecture="topk", num_latents=LATENTS, k=5), D, seed=0)
    x = torch.randn(16, D)
    codes = sae.encode(x)
    assert codes.idx.shape == (16, 5)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    expected = pre.relu().topk(5, dim=1).values
    torch.testing.assert_close(codes.vals.sort(dim=1, descending=True).values, expected)


def test_decoder_rows_stay_unit_norm_and_grad_is_orthogonal(tmp_path):
    src = synthetic()
    sae = build_sae(SAEConfig(architecture="topk", num_latents=LATENTS, k=8), D, seed=1)
    train(sae, src, tmp_path, steps=20)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(LATENTS))
    out = sae(src.batch(5).x)
    out.losses["loss"].backward()
    sae.remove_parallel_grad_()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert parallel.abs().max() < 1e-6


def test_auxk_revives_dead_latents():
    sae = build_sae(SAEConfig(architecture="topk", num_latents=LATENTS, k=8), D, seed=1)
    x = synthetic().batch(0).x
    dead = torch.zeros(LATENTS, dtype=torch.bool)
    dead[:100] = True
    out = sae(x, dead_mask=dead)
    assert "auxk" in out.losses and out.losses["auxk"] > 0
    out.losses["loss"].backward()
    # AuxK sends gradient to dead encoder rows that TopK alone would never touch.
    assert sae.W_enc.grad[:100].abs().sum(dim=1).gt(0).sum() > 0
    no_dead = sae(x, dead_mask=torch.zeros(LATENTS, dtype=torch.bool))
    assert "auxk" not in no_dead.losses


def test_config_dataclass_roundtrip():
    cfg = SAEConfig(architecture="jumprelu", k=4)
    assert SAEConfig(**dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_ghost_grads_reach_only_silenced_latents(arch):
    """Ghost grads: latents silent on every token (b_enc far below zero) get encoder gradient only
    from the ghost term; its value is the batch's FVU (per-token weights); off for SAEs by default."""
    src = synthetic()
    x = src.batch(0).x
    y = x @ torch.randn(D, D, generator=torch.Generator().manual_seed(0)) / D**0.5
    sae = build_sae(SAEConfig(architecture=arch, num_latents=LATENTS, transcode=True), D, D, seed=1)
    with torch.no_grad():
        sae.b_enc[:100] = -20.0  # silent on every token (exp(-20) is still a float32)
        sae.W_dec.normal_()  # a Gated transcoder's starts at zero (its first steps give the rows a direction)
    dead = torch.zeros(LATENTS, dtype=torch.bool)
    dead[:100] = True
    out = sae(x, y, dead_mask=dead)
    assert "ghost" in out.losses and torch.allclose(out.losses["ghost"], out.losses["fvu"], rtol=1e-4)
    out.losses["loss"].backward()
    assert sae.W_enc.grad[:100].abs().sum(dim=1).gt(0).all()  # every silenced row is reached
    sae.zero_grad()
    plain = sae(x, y, dead_mask=torch.zeros(LATENTS, dtype=torch.bool))
    assert "ghost" not in plain.losses
    plain.losses["loss"].backward()
    assert sae.W_enc.grad[:100].abs().sum() == 0  # without it nothing reaches them
    off = build_sae(SAEConfig(architecture=arch, num_latents=LATENTS, transcode=True, ghost_grads=False), D, D)
    assert "ghost" not in off(x, y, dead_mask=dead).losses
    an_sae = build_sae(SAEConfig(architecture=arch, num_latents=LATENTS), D)
    assert "ghost" not in an_sae(x, dead_mask=dead).losses  # null: off for SAEs


@pytest.mark.parametrize("ghost", [False, True])
def test_ghost_grads_bring_silenced_latents_back_in_training(ghost, tmp_path):
    src = synthetic()
    sae = build_sae(SAEConfig(architecture="relu", num_latents=LATENTS, l1_coefficient=0.5, target_l0=0.0,
                              sparsity_warmup_steps=1, ghost_grads=ghost), D, seed=1)
    with torch.no_grad():
        sae.b_enc[: LATENTS // 2] = -0.5  # half of the latents start silent on every token
    train(sae, src, tmp_path, steps=200)
    fired = evaluate_batches(sae, [src.batch(10**6 + i) for i in range(4)])["dead_fraction"]
    print(f"ghost_grads={ghost}: dead {fired:.1%}")
    assert (fired < 0.1) if ghost else (fired > 0.4)

