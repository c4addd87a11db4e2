"""Gradient accumulation reproduces the full-batch gradient (FVU over the whole batch)."""

from __future__ import annotations

import pytest
import torch

from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
from sae.models import SAEConfig, build_sae
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "gated", "matryoshka_topk"])
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


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_clt_accumulation_uses_each_layers_full_batch_variance(activation, tmp_path):
    """A CLT's loss sums one FVU per layer (column slices of the target): each chunk must divide by
    the whole batch's variance of its layer, or accumulation changes the gradient."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=gen) * torch.linspace(0.5, 3.0, 16)
    y = torch.cat([x[:, :8] @ torch.randn(8, 8, generator=gen), 4 * x[:, 8:].tanh()], 1)

    def run(accum):
        cfg = SAEConfig(architecture="clt", clt_layers=2, clt_activation=activation, num_latents=32, k=4,
                        transcode=True, sparsity_warmup_steps=0)
        sae = build_sae(cfg, 16, 16, seed=0)
        tc = TrainConfig(batch_size=256, steps=4, lr=3e-3, lr_warmup_steps=0, grad_accum_steps=accum, progress=False,
                         out_dir=str(tmp_path / f"a{accum}"), dead_tokens_threshold=10**9)
        t = Trainer(tc, {"s": sae}, (x, y))
        t.fit()
        return t.saes["s"].state_dict()

    one, four = run(1), run(4)
    for k in one:
        torch.testing.assert_close(four[k], one[k], atol=2e-5, rtol=1e-4, msg=f"{k} differs")
