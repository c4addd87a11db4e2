"""Bad input fails early with an error naming the problem, and leaves nothing half-written."""

from __future__ import annotations

import pytest
import torch

from sae.buffer.source import Batch
from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
from sae.models import SAEConfig, build_sae
from sae.runners.config import compose_train_config
from sae.runners.train import run_training
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer


def small_run(tmp_path, *overrides):
    return compose_train_config(["train=smoke", f"train.out_dir={tmp_path / 'run'}", "train.steps=5",
                                 "train.batch_size=64", "train.progress=false", "data.synthetic.d=16",
                                 "data.synthetic.num_features=32", "sae.expansion_factor=4", "sae.k=4", *overrides])


def test_dimension_mismatch_between_sae_and_data(tmp_path):
    src = SyntheticSource(SyntheticConfig(d=16), 64)
    sae = build_sae(SAEConfig(num_latents=64, k=4), 24)
    with pytest.raises(ValueError, match=r"d_in=24.*d_in=16"):
        Trainer(TrainConfig(out_dir=str(tmp_path)), {"s": sae}, src)
    with pytest.raises(ValueError, match=r"\[batch, 24\]"):
        sae(torch.randn(8, 16))


class _PoisonedSource:
    """Synthetic batches with a NaN or Inf row from batch ``bad_at`` on."""

    def __init__(self, value: float, bad_at: int = 3):
        self.inner = SyntheticSource(SyntheticConfig(d=16, num_features=32), 64)
        self.d_in = self.d_out = 16
        self.value, self.bad_at = value, bad_at

    def __iter__(self):
        for i, b in enumerate(self.inner):
            x = b.x.clone()
            if i >= self.bad_at:
                x[5, 2] = self.value
            yield Batch(x)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_activations_raise_and_nothing_final_is_written(value, tmp_path):
    sae = build_sae(SAEConfig(num_latents=64, k=4), 16)
    cfg = TrainConfig(batch_size=64, steps=10, lr=1e-3, progress=False, checkpoint_every=2, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"NaN/Inf in 1 row\(s\) \(first: row 5\)"):
        Trainer(cfg, {"s": sae}, _PoisonedSource(value)).fit()
    assert not (tmp_path / "final").exists()
    # The checkpoint taken before the bad batch is complete and loadable.
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"


def test_k_not_below_num_latents():
    with pytest.raises(ValueError, match=r"sae.k=64 must be in \[1, num_latents=64\)"):
        build_sae(SAEConfig(num_latents=64, k=64), 16)
    with pytest.raises(ValueError, match="sae.k=100"):
        build_sae(SAEConfig(architecture="batchtopk", num_latents=64, k=100), 16)


@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_non_positive_lr(lr, tmp_path):
    run = small_run(tmp_path, f"train.lr={lr}")
    with pytest.raises(ValueError, match=rf"train.lr={lr} must be positive"):
        run_training(run)
    assert not (tmp_path / "run").exists()


def test_unknown_architecture(tmp_path):
    run = small_run(tmp_path, "sae.architecture=topq")
    names = r"batchtopk, (.+, )?jumprelu, (.+, )?relu, topk"  # newer families sort in between
    with pytest.raises(ValueError, match=rf"unknown architecture 'topq'; choose one of {names}"):
        run_training(run)
    assert not (tmp_path / "run").exists()


def test_transcoder_needs_target():
    sae = build_sae(SAEConfig(num_latents=64, k=4, transcode=True), 16, 8)
    with pytest.raises(ValueError, match="needs a target"):
        sae(torch.randn(4, 16))


def test_skip_without_transcode():
    with pytest.raises(ValueError, match="skip_connection=true needs sae.transcode=true"):
        build_sae(SAEConfig(num_latents=64, k=4, skip_connection=True), 16)


def test_run_writes_resolved_config_and_summary(tmp_path):
    result = run_training(small_run(tmp_path))
    out = tmp_path / "run"
    text = (out / "config.yaml").read_text()
    assert "architecture: topk" in text and "steps: 5" in text
    assert (out / "final" / "topk" / "sae.safetensors").is_file()
    assert (out / "summary.json").is_file() and (out / "metrics.jsonl").is_file()
    assert result.eval_metrics["topk"]["l0"] <= 4
