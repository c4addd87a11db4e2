"""Gradient accumulation reproduces the full-batch gradient (FVU over the whole batch)."""

from __future__ import annotations

import pytest
import torch

from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
from sae.models import SAEConfig, build_sae
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_accumulated_chunks_equal_one_batch(arch, tmp_path):
    def run(accum):
        src = SyntheticSource(SyntheticConfig(d=16, num_features=48, active_prob=0.06), 256)
        sae = build_sae(SAEConfig(architecture=arch, num_latents=64, k=4, sparsity_warmup_steps=0), 16, seed=0)
        cfg = TrainConfig(batch_size=256, steps=6, lr=3e-3, lr_warmup_steps=0, grad_accum_steps=accum, progress=False,
                          out_dir=str(tmp_path / f"a{accum}"), dead_tokens_threshold=10**9)
        t = Trainer(cfg, {"s": sae}, src)
        t.fit()
        return t.saes["s"].state_dict()

    one, four = run(1), run(4)
    start = build_sae(SAEConfig(architecture=arch, num_latents=64, k=4), 16, seed=0).state_dict()
    for k in one:
        torch.testing.assert_close(four[k], one[k], atol=2e-5, rtol=1e-4, msg=f"{k} differs")
    assert max((one[k] - start[k]).abs().max() for k in ("W_enc", "W_dec")) > 1e-2  # training moved
