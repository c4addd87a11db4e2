"""Checkpoint -> resume reproduces an uninterrupted run exactly."""

from __future__ import annotations

import pytest
import torch

from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
from sae.models import SAEConfig, build_sae
from sae.train.checkpoint import latest_checkpoint, load_trainer_state
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer

D = 24


def make_trainer(out_dir, arch="topk", total_steps=40):
    src = SyntheticSource(SyntheticConfig(d=D, num_features=64, active_prob=0.05), 256)
    arch, _, target = arch.partition("@")  # "relu@6": the penalty's coefficient steered to L0 6
    cfg_kw = dict(k=4) if arch != "relu" else {}
    if target:
        cfg_kw["target_l0"] = float(target)
    saes = {
        "a": build_sae(SAEConfig(architecture=arch, num_latents=96, **cfg_kw), D, seed=0),
        "b": build_sae(SAEConfig(architecture=arch, num_latents=48, **cfg_kw), D, seed=1),
    }
    cfg = TrainConfig(batch_size=256, steps=total_steps, lr=2e-3, lr_warmup_steps=5, lr_decay="cosine",
                      lr_decay_start=0.5, progress=False, log_every=5, dead_tokens_threshold=2048,
                      checkpoint_every=10, out_dir=str(out_dir))
    return Trainer(cfg, saes, src)


def run_until(trainer, n_steps):
    """Train like ``fit`` but stop (as if killed) after ``n_steps`` total steps."""
    trainer.maybe_resume()
    it = iter(trainer.source)
    while trainer.step < n_steps:
        batch = next(it)
        if trainer.step == 0:
            trainer.init_from_data(batch)
        trainer.train_step(batch)
        if trainer.step % trainer.cfg.checkpoint_every == 0:
            trainer.save_checkpoint()


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu", "relu@6", "jumprelu@3"])
def test_resume_matches_uninterrupted(arch, tmp_path):
    straight = make_trainer(tmp_path / "straight", arch)
    straight.fit()

    interrupted = make_trainer(tmp_path / "resumed", arch)
    run_until(interrupted, 23)  # checkpoints at 10 and 20; steps 21-23 are lost
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000020"

    resumed = make_trainer(tmp_path / "resumed", arch)
    resumed.fit()
    assert resumed.step == 40
    for name in ("a", "b"):
        for (pn, p1), (_, p2) in zip(straight.saes[name].state_dict().items(), resumed.saes[name].state_dict().items()):
            torch.testing.assert_close(p1, p2, rtol=0, atol=0, msg=f"{name}.{pn} differs after resume")
        s1 = straight.optimizers[name].state_dict()["state"]
        s2 = resumed.optimizers[name].state_dict()["state"]
        for i in s1:
            torch.testing.assert_close(s1[i]["exp_avg"], s2[i]["exp_avg"], rtol=0, atol=0)
        t1, t2 = straight.trackers[name], resumed.trackers[name]
        torch.testing.assert_close(t1.tokens_since_fired, t2.tokens_since_fired)
        assert straight.sparsity[name].state_dict() == resumed.sparsity[name].state_dict()
        if "@" in arch:  # the controller moved the coefficient (its updates straddle the checkpoints)
            assert straight.sparsity[name].log_multiplier != 0
    assert straight.source.state_dict() == resumed.source.state_dict()


def test_checkpoint_state_loads_without_pickle(tmp_path):
    t = make_trainer(tmp_path)
    run_until(t, 10)
    state = load_trainer_state(latest_checkpoint(tmp_path))  # weights_only=True inside
    assert state["step"] == 10 and state["tokens"] == 2560


def test_checkpoint_is_atomic_when_interrupted(tmp_path, monkeypatch):
    t = make_trainer(tmp_path)
    run_until(t, 10)
    good = latest_checkpoint(tmp_path)

    import sae.train.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    t.train_step(next(iter(t.source)))
    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint()
    assert latest_checkpoint(tmp_path) == good  # the previous checkpoint still stands
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if "00000011" in p.name]
    assert leftovers == []  # the half-written folder was removed


def test_resume_refuses_other_saes(tmp_path):
    t = make_trainer(tmp_path)
    run_until(t, 10)
    src = SyntheticSource(SyntheticConfig(d=D, num_features=64), 256)
    other = Trainer(TrainConfig(batch_size=256, steps=20, progress=False, out_dir=str(tmp_path)),
                    {"zzz": build_sae(SAEConfig(num_latents=48, k=4), D)}, src)
    with pytest.raises(ValueError, match="lacks SAEs"):
        other.maybe_resume()
