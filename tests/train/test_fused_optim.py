"""The fused optimiser step (sae/train/optim.py) equals the unfused sequence it replaces.

Unfused: remove the decoder-parallel gradient, clip the global norm, torch Adam, renormalise the
decoder rows. ``SAEAdam`` runs through the Triton kernels (interpreted on CPU) and through their
eager references; both must agree with the sequence to 1e-6 after several steps, with clipping
active and inactive; its state must load into torch Adam and back; bf16 moments stay bf16; the
bf16 copy of W_enc it refreshes is the cast of the new weights; and the Trainer picks it only on
the Triton backend outside exact mode.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae.models import SAEConfig, build_sae
from sae.train.config import TrainConfig
from sae.train.optim import SAEAdam
from sae.train.schedule import build_optimizer

D, L = 24, 96


def pair(grad_clip: float, **train_kw):
    cfg = TrainConfig(grad_clip=grad_clip, **train_kw)
    fused = build_sae(SAEConfig(num_latents=L, k=4), D, seed=0)
    plain = build_sae(SAEConfig(num_latents=L, k=4), D, seed=0)
    plain_opt = build_optimizer(plain, 3e-3, TrainConfig(grad_clip=grad_clip))
    return cfg, fused, plain, build_optimizer(fused, 3e-3, cfg, fused_step=True), plain_opt


def unfused_step(sae, opt, grad_clip: float) -> None:
    sae.remove_parallel_grad_()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    opt.step()
    sae.normalize_decoder_()


def set_grads(a, b, step: int, scale: float) -> None:
    g = torch.Generator().manual_seed(step)
    for pa, pb in zip(a.parameters(), b.parameters()):
        grad = torch.randn(pa.shape, generator=g) * scale
        pa.grad, pb.grad = grad.clone(), grad.clone()


@pytest.fixture(params=["triton", "eager"])
def kernels(request, monkeypatch):
    if request.param == "triton":
        request.getfixturevalue("triton_interpreted")
    else:
        monkeypatch.setenv("SAE_KERNEL_BACKEND", "eager")
    return request.param


@pytest.fixture
def triton_interpreted(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("SAE_KERNEL_BACKEND", "triton")
    import sae_kernels.triton_ops as T

    if not T.INTERPRETED:
        pytest.fail("triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it)")


@pytest.mark.parametrize("grad_clip,scale", [(1.0, 1.0), (1.0, 1e-3), (0.0, 1.0)],
                         ids=["clipping", "below_clip_norm", "no_clip"])
def test_fused_step_equals_unfused_sequence(kernels, grad_clip, scale):
    cfg, fused, plain, opt_f, opt_p = pair(grad_clip)
    assert isinstance(opt_f, SAEAdam) and not isinstance(opt_p, SAEAdam)
    start = {n: p.detach().clone() for n, p in plain.named_parameters()}
    for step in range(5):
        set_grads(fused, plain, step, scale)
        opt_f.step()
        unfused_step(plain, opt_p, grad_clip)
    for (name, pf), pp in zip(fused.named_parameters(), plain.parameters()):
        assert (pp - start[name]).abs().max() > 1e-4, f"{name} did not move: a vacuous comparison"
        torch.testing.assert_close(pf, pp, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(fused.W_dec.norm(dim=1), torch.ones(L), rtol=0, atol=1e-6)


def test_state_moves_between_fused_and_torch_adam(triton_interpreted):
    cfg, fused, plain, opt_f, opt_p = pair(1.0)
    for step in range(3):
        set_grads(fused, plain, step, 1.0)
        opt_f.step()
        unfused_step(plain, opt_p, 1.0)
    # Swap the optimisers' states: each continues the other's run.
    state_f, state_p = opt_f.state_dict(), opt_p.state_dict()
    opt_f.load_state_dict(state_p)
    opt_p.load_state_dict(state_f)
    assert opt_f.state[fused.W_enc]["step"].device.type == "cpu"
    for step in range(3, 5):
        set_grads(fused, plain, step, 1.0)
        opt_f.step()
        unfused_step(plain, opt_p, 1.0)
    for pf, pp in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(pf, pp, rtol=1e-6, atol=1e-6)


def test_bf16_moments_stay_bf16_and_track_fp32(triton_interpreted):
    cfg, fused, plain, opt_f, opt_p = pair(1.0, adam_state_dtype="bfloat16")
    for step in range(4):
        set_grads(fused, plain, step, 1.0)
        opt_f.step()
        unfused_step(plain, opt_p, 1.0)
    assert opt_f.state[fused.W_enc]["exp_avg"].dtype == torch.bfloat16
    opt_f.load_state_dict(opt_f.state_dict())  # torch casts states to the parameter dtype on load
    assert opt_f.state[fused.W_dec]["exp_avg_sq"].dtype == torch.bfloat16
    for pf, pp in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(pf, pp, rtol=0, atol=3e-4)  # 4 steps of lr 3e-3 with 8-bit moments
    with pytest.raises(ValueError, match="adam_state_dtype"):
        build_optimizer(plain, 1e-3, TrainConfig(adam_state_dtype="bfloat16"))


def test_fused_step_refreshes_the_bf16_copy_of_W_enc(triton_interpreted):
    cfg, fused, plain, opt_f, _ = pair(1.0)
    copy = fused.lowp_copies()[fused.W_enc]
    stale = copy.get(fused.W_enc).clone()
    set_grads(fused, plain, 0, 1.0)
    version = fused.W_enc._version
    opt_f.step()
    assert fused.W_enc._version > version  # the kernel's write is visible to version-based caches
    assert copy.tensor is not None and not torch.equal(copy.tensor, stale)
    assert ((copy.tensor.float() - fused.W_enc.detach()).abs() <= fused.W_enc.detach().abs() * 2**-7).all()
    copy.tensor[0, 0] = 123.0  # a sentinel: while the step's copy is vouched for, get() does not cast again
    assert copy.get(fused.W_enc)[0, 0] == 123.0
    with torch.no_grad():
        fused.W_enc.mul_(2)  # any in-place change that bumps the version ends the vouching
    torch.testing.assert_close(copy.get(fused.W_enc).float(), fused.W_enc.detach(), rtol=2**-8, atol=0)


def test_bf16_copy_follows_writers_that_do_not_bump_versions():
    """torch.optim.Adam(fused=True) updates parameters without bumping their version counters: the
    selection must still see the new W_enc (a stale copy once trained CPU runs on the initial
    encoder's choices)."""
    sae = build_sae(SAEConfig(num_latents=L, k=4, selection_dtype="bfloat16"), D, seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=0.1, fused=True)
    x_in = sae.encoder_input(torch.randn(8, D))
    sae.selection_scores(x_in)  # fills the copy
    for p in sae.parameters():
        p.grad = torch.randn_like(p)
    version = sae.W_enc._version
    opt.step()
    assert sae.W_enc._version == version  # what makes version-only caching unsafe
    expected = torch.addmm(sae.b_enc.to(torch.bfloat16), x_in.to(torch.bfloat16), sae.W_enc.to(torch.bfloat16).T)
    assert torch.equal(sae.selection_scores(x_in), expected)


@pytest.mark.parametrize("deterministic", [False, True])
def test_trainer_picks_the_fused_step_on_triton_outside_exact_mode(triton_interpreted, tmp_path, deterministic):
    from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
    from sae.train.trainer import Trainer

    sae = build_sae(SAEConfig(num_latents=64, k=4), 16, seed=0)
    cfg = TrainConfig(batch_size=32, steps=2, device="cpu", out_dir=str(tmp_path), deterministic=deterministic,
                      progress=False, eval_every=0, final_report=False)
    trainer = Trainer(cfg, {"topk": sae}, SyntheticSource(SyntheticConfig(d=16), 32))
    assert trainer.fused_step is (not deterministic)
    assert isinstance(trainer.optimizers["topk"], SAEAdam) is (not deterministic)


def test_a_clt_takes_torch_adam_and_the_trainers_decoder_passes(triton_interpreted, tmp_path):
    """SAEAdam keeps one [L, E] decoder at unit rows; a CLT's rows span W_dec[0..n-1]: where the
    trainer would fuse, the CLT gets torch's Adam and the trainer's projection and renormalisation."""
    from sae.train.trainer import Trainer

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = torch.cat([x[:, :8].tanh(), x[:, 8:] @ torch.randn(8, 8, generator=gen)], 1)
    cfg = SAEConfig(architecture="clt", clt_layers=2, num_latents=32, k=4, transcode=True, normalize_decoder=True)
    sae = build_sae(cfg, 16, 16, seed=0)
    tc = TrainConfig(batch_size=64, steps=3, lr=1e-2, lr_warmup_steps=0, progress=False, out_dir=str(tmp_path / "r"))
    trainer = Trainer(tc, {"clt": sae}, (x, y))
    assert trainer.fused_step  # the Triton backend: other SAEs would take SAEAdam here
    assert isinstance(trainer.optimizers["clt"], torch.optim.Adam)
    trainer.fit()
    for W in trainer.saes["clt"].W_dec:
        torch.testing.assert_close(W.detach().flatten(1).norm(dim=1), torch.ones(W.shape[0]))
    with pytest.raises(ValueError, match="adam_state_dtype='bfloat16' .* architecture 'clt'"):
        Trainer(dataclasses.replace(tc, adam_state_dtype="bfloat16", out_dir=str(tmp_path / "b")),
                {"clt": build_sae(cfg, 16, 16, seed=0)}, (x, y))
