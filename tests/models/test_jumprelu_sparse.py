"""The JumpReLU training step without a dense backward equals the dense reference.

``JumpReLUSAE.forward`` keeps only active and straight-through-band entries (bags of slots, see
``sae_kernels.jumprelu``); ``forward_dense`` (``dense_backward = True``) is the reference with
autograd through [B, L] tensors. Same losses, same gradients for every parameter (W_enc, b_enc,
W_dec, b_dec, log_threshold, W_skip) to 1e-6 in fp32, for SAEs, transcoders and skip transcoders, on
batches built to hold band entries on both sides of a threshold, a latent whose band reaches 0
(every token in it), a token with no active latent and tokens spread over several bags; the
backward saves and produces nothing of [B, L] size; the trainer takes identical steps either way.
"""

from __future__ import annotations

import functools

import pytest
import torch
from sae_kernels import jumprelu as kj
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
from sae.models import SAEConfig, SparseCodes, build_sae
from sae.models import jumprelu as model_module
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer

D, E, L, B = 12, 10, 48, 24
FORMS = {"sae": dict(), "transcoder": dict(transcode=True),
         "skip_transcoder": dict(transcode=True, skip_connection=True)}


def dense_codes(codes: SparseCodes, num_latents: int) -> torch.Tensor:
    out = torch.zeros(codes.vals.shape[0], num_latents)
    return out.scatter_add_(1, codes.idx, codes.vals.detach())


def make_case(form: str, seed: int = 0):
    """An initialised JumpReLU (or transcoder) and a batch with band entries, a whole-column band
    latent and a token without active latents. Returns (sae, x, y, marks)."""
    kw = FORMS[form]
    cfg = SAEConfig(architecture="jumprelu", num_latents=L, k=6, l0_coefficient=0.3, jumprelu_bandwidth=0.2, **kw)
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(cfg, D, E if cfg.transcode else None, seed=seed)
    x = torch.randn(B, D, generator=g)
    y = torch.randn(B, E, generator=g) if cfg.transcode else None
    sae.init_from_data(x, y)
    with torch.no_grad():
        sae.b_dec.add_(0.1 * torch.randn(sae.d_out, generator=g))
        if sae.W_skip is not None:
            sae.W_skip.copy_(0.3 * torch.randn(sae.W_skip.shape, generator=g))
        x[2] = sae.b_dec if not cfg.transcode else 0.0  # encoder input 0: pre = b_enc = 0, nothing fires
        z = sae.pre_activations(sae.encoder_input(x)).relu()
        eps = sae.bandwidth
        theta = sae.threshold.clone()
        i0 = int(z[0].argmax())  # active, in the band: theta just under z
        theta[i0] = z[0, i0] - eps / 4
        i1 = int(torch.where(torch.arange(L) == i0, -1.0, z[1]).argmax())  # inactive, in the band
        theta[i1] = z[1, i1] + eps / 4
        # Band reaching z = 0: every token where the latent's pre-activation is <= 0 is in it.
        zeros = (z == 0).sum(0).float()
        zeros[[i0, i1]] = -1
        i2 = int(zeros.argmax())
        theta[i2] = eps / 4
        sae.log_threshold.copy_(theta.log())
    return sae, x, y, (i0, i1, i2)


def grads(sae, x, y, *, dense: bool, sparsity_scale: float = 0.7):
    sae.zero_grad(set_to_none=True)
    sae.dense_backward = dense
    out = sae(x, y, sparsity_scale=sparsity_scale)
    out.losses["loss"].backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("width", [None, 3], ids=["auto_width", "width3"])
@pytest.mark.parametrize("form", list(FORMS))
def test_sparse_step_equals_dense_reference(form, width, monkeypatch):
    if width is not None:  # narrow bags: tokens span several bags
        monkeypatch.setattr(model_module, "threshold_select", functools.partial(kj.threshold_select, width=width))
    sae, x, y, (i0, i1, i2) = make_case(form)
    ref, g_ref = grads(sae, x, y, dense=True)
    out, g = grads(sae, x, y, dense=False)

    # The batch holds what the test is about.
    z, theta, eps = sae.pre_activations(sae.encoder_input(x)).relu().detach(), sae.threshold.detach(), sae.bandwidth
    band = kj.rect((z - theta) / eps).bool()
    assert band[0, i0] and z[0, i0] > theta[i0] and band[1, i1] and z[1, i1] <= theta[i1]
    assert band[z[:, i2] == 0, i2].all() and (z[:, i2] == 0).sum() >= B // 4 and (ref.codes[2] == 0).all()
    if width is not None:
        assert ((z > kj.candidate_floor(theta, eps)).sum(1) > width).any()

    for key in ("fvu", "l0", "loss"):
        torch.testing.assert_close(out.losses[key], ref.losses[key], rtol=1e-6, atol=1e-6)
    assert set(g) == set(g_ref) == {n for n, _ in sae.named_parameters()}
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-6, atol=1e-6, msg=name)
    assert (g["log_threshold"][[i0, i1, i2]] != 0).all()  # the estimators reached every band latent
    # Codes: the same values, decoding to the same reconstruction.
    assert isinstance(out.codes, SparseCodes)
    torch.testing.assert_close(dense_codes(out.codes, L), ref.codes.detach(), rtol=0, atol=0)
    torch.testing.assert_close(sae.decode(out.codes), sae.decode(ref.codes), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=1e-6, atol=1e-6)


def test_nothing_active_anywhere_still_matches():
    sae, x, y, _ = make_case("sae", seed=1)
    with torch.no_grad():
        sae.log_threshold.fill_(10.0)  # no entry active or in any band
    ref, g_ref = grads(sae, x, y, dense=True)
    out, g = grads(sae, x, y, dense=False)
    assert ref.losses["l0"] == 0 and out.losses["l0"] == 0
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-6, atol=1e-6, msg=name)
    assert (g["W_enc"] == 0).all() and (g["log_threshold"] == 0).all()


class _OutputSizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense_control"])
def test_backward_has_no_batch_by_latents_tensor(dense):
    Bb, Lb, Db = 256, 4096, 32  # a [B, L] fp32 tensor is 4 MiB; an [L, D] gradient 512 KiB
    cfg = SAEConfig(architecture="jumprelu", num_latents=Lb, k=8, l0_coefficient=0.1, b_dec_init="zeros")
    sae = build_sae(cfg, Db, seed=0)
    x = torch.randn(Bb, Db, generator=torch.Generator().manual_seed(0))
    sae.init_from_data(x)
    sae.dense_backward = dense
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sae(x).losses["loss"]
    mode = _OutputSizes()
    with mode:
        loss.backward()
    assert all(p.grad is not None for p in sae.parameters())
    limit = Bb * Lb  # bytes of a [B, L] bool mask: 1/4 of an fp32 [B, L] tensor
    if dense:  # the control: the detectors fire on the dense path
        assert max(saved) >= 4 * limit and mode.largest >= 4 * limit
    else:
        assert max(saved) < limit and mode.largest <= Lb * Db * 4


def test_trainer_steps_match_dense_reference(tmp_path):
    results = []
    for dense in (True, False):
        src = SyntheticSource(SyntheticConfig(d=16, num_features=64, active_prob=0.05), 128)
        sae = build_sae(SAEConfig(architecture="jumprelu", num_latents=64, k=6, l0_coefficient=0.01), 16, seed=3)
        sae.dense_backward = dense
        cfg = TrainConfig(batch_size=128, steps=4, lr=3e-3, lr_warmup_steps=0, progress=False, log_every=1,
                          dead_tokens_threshold=1000, out_dir=str(tmp_path / f"run{dense}"), resume=False)
        trainer = Trainer(cfg, {"sae": sae}, src)
        metrics = trainer.fit()
        results.append((sae.state_dict(), metrics, trainer.trackers["sae"].tokens_since_fired.clone()))
    (p_ref, m_ref, t_ref), (p, m, t) = results
    for name in p_ref:
        torch.testing.assert_close(p[name], p_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert m["train/l0/sae"] == m_ref["train/l0/sae"] > 0
    torch.testing.assert_close(m["train/loss/sae"], m_ref["train/loss/sae"], rtol=1e-5, atol=0)
    assert torch.equal(t, t_ref)


def test_a_nan_encoder_row_reaches_the_loss_as_on_the_dense_path():
    """NaN must not be filtered out by the candidate selection (the latent would die silently while
    the loss stays finite); the trainer's non-finite check then stops the run, as for dense."""
    sae = build_sae(SAEConfig(architecture="jumprelu", num_latents=L, k=4), D, seed=0)
    x = torch.randn(B, D)
    sae.init_from_data(x)
    with torch.no_grad():
        sae.W_enc[5] = float("nan")
    assert torch.isnan(sae.forward_dense(x).losses["loss"])
    assert torch.isnan(sae(x).losses["loss"])
