"""train.init_from: fine-tune a published SAE without resetting it."""

from __future__ import annotations

import pytest
import torch

from sae.runners.config import compose_train_config
from sae.runners.train import run_training
from sae.train.artifact import load_sae

BASE = ["train=smoke", "train.batch_size=128", "train.progress=false", "train.final_report=false",
        "train.eval_every=0", "data.synthetic.d=16", "data.synthetic.num_features=32", "sae.expansion_factor=4",
        "sae.k=4"]


def test_init_from_continues_from_the_published_weights(tmp_path):
    first = run_training(compose_train_config([*BASE, "train.steps=30", f"train.out_dir={tmp_path / 'a'}"]))
    published = load_sae(first.final_dirs["topk"])
    second = run_training(compose_train_config([
        *BASE, "train.steps=1", "train.lr=1e-12", f"train.out_dir={tmp_path / 'b'}",
        f"train.init_from={first.final_dirs['topk']}"]))
    tuned = load_sae(second.final_dirs["finetune"])
    for k, v in published.state_dict().items():  # b_dec kept: no data-dependent re-init
        torch.testing.assert_close(tuned.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)
    assert second.eval_metrics["finetune"]["fvu"] == pytest.approx(first.eval_metrics["topk"]["fvu"], rel=1e-3)


def test_init_from_refuses_variants(tmp_path):
    first = run_training(compose_train_config([*BASE, "train.steps=2", f"train.out_dir={tmp_path / 'a'}"]))
    run = compose_train_config([*BASE, f"train.out_dir={tmp_path / 'b'}", f"train.init_from={first.final_dirs['topk']}",
                                "+variants={k2: {k: 2}}"])
    with pytest.raises(ValueError, match="remove the variants"):
        run_training(run)
