"""Parity of the sparse JumpReLU ops (``sae_kernels.jumprelu``) with dense references.

- :func:`threshold_select` keeps exactly the entries of a dense mask ``pre > floor`` (odd shapes,
  ``-inf`` columns, empty and full rows, one bag or several per token, fp32/bf16), in valid bags;
- :func:`candidate_floor` never drops an active or band entry, even a few float steps from the band
  edge, across threshold and bandwidth scales;
- :func:`jumprelu_slots` gives the dense reference's codes, L0 and gradients (pre-activations and
  thresholds) in fp32 and fp64;
- the JumpReLU SAE step on the Triton backend (kernels in the interpreter, as on CUDA) equals the
  dense reference. The ops themselves are plain PyTorch, so they have no Triton kernel of their own.
"""

from __future__ import annotations

import pytest
import torch
from sae_kernels.jumprelu import (
    bag_width,
    candidate_floor,
    jumprelu_slots,
    rect,
    reference_jumprelu,
    threshold_select,
    token_codes,
)

from sae.models import SAEConfig, build_sae

CASES = {  # name: (B, L, width, dtype)
    "auto_width": (9, 37, None, torch.float32),
    "width1": (5, 11, 1, torch.float32),
    "width3_multi_bag": (7, 29, 3, torch.float32),
    "wide": (4, 13, 64, torch.float32),
    "bf16": (6, 21, 4, torch.bfloat16),
}


def make_pre(B: int, L: int, dtype: torch.dtype, seed: int = 0):
    """Pre-activations with an empty row (1), a full row (2) and two ``-inf`` floor columns."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(B, L, generator=g).to(dtype)
    floor = (0.5 + torch.rand(L, generator=g)).to(dtype)
    floor[[0, L // 2]] = -float("inf")
    pre[1] = -5.0
    if B > 2:
        pre[2] = 10.0
    return pre, floor


@pytest.mark.parametrize("case", list(CASES))
def test_threshold_select_keeps_exactly_the_dense_mask(case):
    B, L, width, dtype = CASES[case]
    pre, floor = make_pre(B, L, dtype)
    s = threshold_select(pre, floor, width)
    N, K = s.idx.shape
    mask = pre > floor
    counts = mask.sum(1)
    assert width is None or K == width
    # Same entries, same values; nothing kept twice.
    rows = s.token.unsqueeze(1).expand(N, K)[s.valid]
    kept = torch.zeros(B, L, dtype=torch.int64).index_put_((rows, s.idx[s.valid]), torch.tensor(1), accumulate=True)
    assert torch.equal(kept, mask.long())
    assert torch.equal(s.vals[s.valid], pre[rows, s.idx[s.valid]])
    assert (s.vals[~s.valid] == 0).all()
    # Bags: token order, ceil(n / K) per token, filled from the front, latents increasing per token,
    # padding repeating the bag's first latent.
    assert (s.token.diff() >= 0).all()
    assert torch.equal(torch.bincount(s.token, minlength=B), (counts + K - 1) // K)
    assert s.valid[:, 0].all() and (s.valid.long().diff(dim=1) <= 0).all()
    for b in range(B):
        lat = s.idx[s.token == b][s.valid[s.token == b]]
        assert (lat.diff() > 0).all()
    assert torch.equal(s.idx[~s.valid], s.idx[:, :1].expand(N, K)[~s.valid])


def test_threshold_select_with_nothing_kept_has_one_padding_bag():
    s = threshold_select(torch.zeros(3, 5), torch.ones(5))
    assert s.idx.shape[0] == 1 and not s.valid.any() and s.token.tolist() == [0]


def test_threshold_select_rejects_mismatched_floor():
    with pytest.raises(ValueError, match="floor"):
        threshold_select(torch.zeros(3, 5), torch.ones(4))


def test_bag_width_trades_padding_against_rows():
    assert bag_width(torch.full((100,), 40)) == 40
    heavy_tail = torch.cat([torch.full((255,), 39), torch.tensor([1000])])
    w = bag_width(heavy_tail)
    assert w < 100  # not padded to the outlier
    assert (((heavy_tail + w - 1) // w) * w).sum() < 2 * heavy_tail.sum()
    assert bag_width(torch.zeros(4, dtype=torch.int64)) == 1


@pytest.mark.parametrize("theta_scale", [1e-3, 1.0, 300.0])
@pytest.mark.parametrize("eps", [1e-3, 0.05, 2.0])
def test_candidate_floor_keeps_every_active_and_band_entry(theta_scale, eps):
    g = torch.Generator().manual_seed(0)
    L = 64
    theta = theta_scale * (0.2 + torch.rand(L, generator=g))
    # Entries at and a few float steps around both band edges and the threshold itself.
    centers = torch.stack([theta - eps / 2, theta, theta + eps / 2])  # [3, L]
    z = [centers]
    up, down = centers.clone(), centers.clone()
    for _ in range(4):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, -float("inf")))
        z += [up, down]
    z = torch.cat(z).relu()  # [27, L]
    needed = (z > theta) | rect((z - theta) / eps).bool()
    floor = candidate_floor(theta, eps)
    assert needed.any() and (z[needed] > floor.expand_as(z)[needed]).all()
    wide = theta > eps
    assert (floor[wide] > theta[wide] - eps).all()  # tight: only a thin margin below the band
    assert torch.isinf(floor[theta < eps / 2]).all() and not torch.isinf(floor[theta > eps]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [None, 2])
def test_jumprelu_slots_equal_dense_reference(dtype, width):
    g = torch.Generator().manual_seed(1)
    B, L, eps = 11, 19, 0.3
    pre = torch.randn(B, L, generator=g, dtype=dtype)
    theta = (0.3 + torch.rand(L, generator=g, dtype=dtype))
    theta[3] = eps / 4  # band reaching z = 0: pre <= 0 entries of latent 3 are in it
    pre[0, 5], pre[1, 5] = theta[5] + eps / 4, theta[5] - eps / 4  # band entries either side
    G, c = torch.randn(B, L, generator=g, dtype=dtype), 0.7

    pre_d, theta_d = pre.clone().requires_grad_(), theta.clone().requires_grad_()
    f_d, l0_d = reference_jumprelu(pre_d, theta_d, eps)
    ((f_d * G).sum() + c * l0_d).backward()

    s = threshold_select(pre, candidate_floor(theta, eps), width)
    pre_s, theta_s = s.vals.clone().requires_grad_(), theta.clone().requires_grad_()
    f_s, l0_s = jumprelu_slots(pre_s, theta_s, s.idx, s.valid, eps, num_tokens=B)
    rows = s.token.unsqueeze(1).expand_as(s.idx)
    ((f_s * G[rows, s.idx]).sum() + c * l0_s).backward()

    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    dense_f = torch.zeros(B, L, dtype=dtype).index_put_((rows[s.valid], s.idx[s.valid]), f_s.detach()[s.valid])
    assert torch.equal(dense_f, f_d.detach()) and (f_s.detach()[~s.valid] == 0).all()
    assert l0_s.item() == l0_d.item()
    band = rect((pre.relu() - theta) / eps).bool()
    assert band[:, 3].sum() > 2 and band[0, 5] and band[1, 5]
    assert (theta_d.grad[[3, 5]] != 0).all()
    torch.testing.assert_close(theta_s.grad, theta_d.grad, **tol)
    g_pre = torch.zeros(B, L, dtype=dtype).index_put_((rows[s.valid], s.idx[s.valid]), pre_s.grad[s.valid])
    torch.testing.assert_close(g_pre, pre_d.grad, **tol)  # zero wherever no slot was kept
    assert (pre_s.grad[~s.valid] == 0).all()


def test_token_codes_are_the_nonzero_codes_per_token():
    pre, floor = make_pre(6, 17, torch.float32)
    s = threshold_select(pre, floor, 2)
    f = (s.vals * (s.vals > 1.0)).requires_grad_()
    vals, idx = token_codes(f, s, 6)
    dense = torch.zeros(6, 17).scatter_add_(1, idx, vals.detach())
    expect = (pre * (pre > floor) * (pre > 1.0))
    assert torch.equal(dense, expect)
    assert vals.shape[1] == max(int((expect != 0).sum(1).max()), 1)
    vals.sum().backward()
    assert torch.equal(f.grad, (f.detach() != 0).float())


@pytest.mark.parametrize("form", ["sae", "skip_transcoder"])
def test_sae_step_on_triton_backend_equals_dense_reference(form, triton_ops):
    kw = dict(transcode=True, skip_connection=True) if form == "skip_transcoder" else {}
    cfg = SAEConfig(architecture="jumprelu", num_latents=32, k=4, l0_coefficient=0.2, jumprelu_bandwidth=0.5, **kw)
    g = torch.Generator().manual_seed(0)
    sae = build_sae(cfg, 8, 6 if cfg.transcode else None, seed=0)
    x = torch.randn(10, 8, generator=g)
    y = torch.randn(10, 6, generator=g) if cfg.transcode else None
    sae.init_from_data(x, y)
    if sae.W_skip is not None:
        with torch.no_grad():
            sae.W_skip.normal_(generator=g)
    results = []
    for dense in (True, False):
        sae.zero_grad(set_to_none=True)
        sae.dense_backward = dense
        out = sae(x, y)
        out.losses["loss"].backward()
        results.append((out.losses["loss"].detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (loss_ref, g_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert (g_ref["log_threshold"] != 0).any()
    for name in g_ref:
        torch.testing.assert_close(grads[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)
