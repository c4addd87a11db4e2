"""Exact fp32 runs are unchanged bit for bit; the fast path trains the same SAE within a stated tolerance.

1. The trainer with ``sae.selection_dtype=float32`` (and with ``train.deterministic=true`` on a
   machine that would pick bf16) equals, bitwise, a hand-written loop of the exact algorithm as it
   ran before the hardware-aware defaults and the fused step: fp32 selection, ``gather_encode ->
   relu -> sparse_decode``, FVU and AuxK by autograd, projection, clip, torch Adam, renormalise,
   dead-latent counters. AuxK is active (a short dead window), so its path is covered too.
2. The fast path (Triton kernels in the interpreter: the fused autoencode Function and SAEAdam,
   with bf16 selection) against the exact path on the synthetic source: per-step training FVU
   within 5% of the exact run's and final held-out FVU within 2% (measured: see the asserts).
"""

from __future__ import annotations

import pytest
import torch
from sae_kernels import gather_encode, sparse_decode

from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
from sae.models import SAEConfig, build_sae, fvu, precision
from sae.train.config import TrainConfig
from sae.train.schedule import lr_factor
from sae.train.trainer import Trainer

D, L, K, B, STEPS = 16, 128, 4, 32, 12


def source():
    return SyntheticSource(SyntheticConfig(d=D, num_features=48, active_prob=0.06, noise_std=0.01), B)


def train_cfg(tmp_path, steps: int = STEPS, **kw) -> TrainConfig:
    return TrainConfig(batch_size=B, steps=steps, device="cpu", out_dir=str(tmp_path), lr=3e-3, lr_warmup_steps=3,
                       dead_tokens_threshold=2 * B, progress=False, eval_every=0, final_report=False,
                       log_every=1, **kw)


def trainer_params(tmp_path, sae_cfg: SAEConfig, **train_kw) -> dict[str, torch.Tensor]:
    sae = build_sae(sae_cfg, D, seed=0)
    trainer = Trainer(train_cfg(tmp_path, **train_kw), {"topk": sae}, source())
    trainer.fit()
    return {n: p.detach().clone() for n, p in trainer.saes["topk"].named_parameters()}


def reference_params(tmp_path) -> tuple[dict[str, torch.Tensor], int]:
    """The exact step, written out as the trainer ran it before the fused path existed."""
    cfg = train_cfg(tmp_path)
    sae = build_sae(SAEConfig(num_latents=L, k=K, selection_dtype="float32"), D, seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, STEPS, cfg))
    since_fired = torch.zeros(L, dtype=torch.int64)
    auxk_steps = 0
    for step, batch in zip(range(STEPS), source()):
        x = batch.x.float()
        if step == 0:
            sae.init_from_data(x[: cfg.b_dec_init_samples])
        x_in = x - sae.b_dec
        with torch.no_grad():
            pre = torch.addmm(sae.b_enc, x_in, sae.W_enc.T)
            top, idx = pre.topk(K, dim=1, sorted=False)
        vals = gather_encode(x_in, sae.W_enc, sae.b_enc, idx, top).relu()
        x_hat = sparse_decode(idx, vals, sae.W_dec, sae.b_dec)
        loss = fvu(x_hat, x)
        dead = since_fired >= cfg.dead_tokens_threshold
        if dead.any():
            auxk_steps += 1
            dead_idx = dead.nonzero().squeeze(1)
            k_aux = min(sae.k_aux, dead_idx.numel())
            with torch.no_grad():
                aux_pre, pos = pre.index_select(1, dead_idx).topk(k_aux, dim=1, sorted=False)
            aux_vals = gather_encode(x_in, sae.W_enc, sae.b_enc, dead_idx[pos], aux_pre).relu()
            e_hat = sparse_decode(dead_idx[pos], aux_vals, sae.W_dec)
            loss = loss + sae.cfg.auxk_alpha * min(dead_idx.numel() / sae.k_aux, 1.0) * fvu(e_hat, (x - x_hat).detach())
        loss.backward()
        sae.remove_parallel_grad_()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        with torch.no_grad():
            fired = torch.zeros(L).index_add_(0, idx.reshape(-1), (vals > 0).reshape(-1).float())
            since_fired += B
            since_fired[fired > 0] = 0
    return {n: p.detach().clone() for n, p in sae.named_parameters()}, auxk_steps


def test_explicit_fp32_and_deterministic_runs_are_bitwise_the_exact_algorithm(tmp_path, monkeypatch):
    ref, auxk_steps = reference_params(tmp_path / "ref")
    assert auxk_steps >= STEPS // 2, "AuxK must run for the comparison to cover it"
    # A machine with native bf16, where auto would select in bf16: explicit float32 and exact mode win.
    monkeypatch.delenv(precision.AUTO_ENV_VAR, raising=False)
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda device: True)
    runs = {
        "selection_dtype=float32": trainer_params(tmp_path / "a", SAEConfig(num_latents=L, k=K,
                                                                             selection_dtype="float32")),
        "train.deterministic=true": trainer_params(tmp_path / "b", SAEConfig(num_latents=L, k=K), deterministic=True),
    }
    for what, params in runs.items():
        for name, p in ref.items():
            assert torch.equal(params[name], p), f"{what}: {name} differs from the exact algorithm"


def held_out_fvu(params: dict[str, torch.Tensor]) -> float:
    sae = build_sae(SAEConfig(num_latents=L, k=K, selection_dtype="float32"), D, seed=0)
    sae.load_state_dict(params)
    x = SyntheticSource(SyntheticConfig(d=D, num_features=48, active_prob=0.06, noise_std=0.01, seed=7), 2048)
    with torch.no_grad():
        return float(sae(next(iter(x)).x).losses["fvu"])


@pytest.mark.slow
def test_fast_path_trains_like_the_exact_path(tmp_path, monkeypatch):
    """14 steps; about 45 s on 2 CPU cores (the Triton kernels run in the interpreter)."""
    import sae_kernels.triton_ops as T

    assert T.INTERPRETED
    exact_log, fast_log = [], []

    def run(out, log, **kw):
        sae = build_sae(SAEConfig(num_latents=L, k=K), D, seed=0)
        trainer = Trainer(train_cfg(out, steps=14, **kw), {"topk": sae}, source())
        trainer.step_hooks.append(lambda t: log.append(t.last_metrics["train/fvu/topk"]))
        trainer.fit()
        return trainer, {n: p.detach().clone() for n, p in trainer.saes["topk"].named_parameters()}

    monkeypatch.setenv(precision.AUTO_ENV_VAR, "float32")
    monkeypatch.setenv("SAE_KERNEL_BACKEND", "eager")
    exact_trainer, exact = run(tmp_path / "exact", exact_log, deterministic=True)
    monkeypatch.setenv(precision.AUTO_ENV_VAR, "bfloat16")
    monkeypatch.setenv("SAE_KERNEL_BACKEND", "triton")
    fast_trainer, fast = run(tmp_path / "fast", fast_log)
    assert fast_trainer.fused_step and not exact_trainer.fused_step
    assert fast_trainer.saes["topk"].approximate_selection(torch.zeros(1, D))
    exact_curve, fast_curve = torch.tensor(exact_log), torch.tensor(fast_log)
    assert exact_curve[-5:].mean() < 0.9 * exact_curve[:5].mean(), "the exact run must learn"
    gap = ((fast_curve - exact_curve).abs() / exact_curve).max().item()
    h_exact, h_fast = held_out_fvu(exact), held_out_fvu(fast)
    # Measured: largest per-step gap 2.4% (bf16 selection breaks near-ties differently, and the two
    # runs then see slightly different models); held-out FVU 0.4787 exact vs 0.4797 fast (+0.2%).
    print(f"largest per-step train FVU gap {100 * gap:.1f}%; held-out FVU exact {h_exact:.4f} fast {h_fast:.4f}")
    assert gap <= 0.05
    assert abs(h_fast - h_exact) <= 0.02 * h_exact
