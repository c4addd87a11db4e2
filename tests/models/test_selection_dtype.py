"""``sae.selection_dtype=bfloat16``: latents chosen from bf16 pre-activations, values and gradients exact."""

from __future__ import annotations

import pytest
import torch

from sae.models import SAEConfig, build_sae

D, L, K, B = 48, 1024, 16, 256


def pair(arch: str):
    exact = build_sae(SAEConfig(architecture=arch, num_latents=L, k=K), D, seed=3)
    approx = build_sae(SAEConfig(architecture=arch, num_latents=L, k=K, selection_dtype="bfloat16"), D, seed=3)
    return exact, approx


def dense_pre(sae, x):
    return sae.encoder_input(x) @ sae.W_enc.T + sae.b_enc


def test_default_selection_is_exact_and_untouched():
    exact, _ = pair("topk")
    x = torch.randn(B, D)
    x_in = exact.encoder_input(x)
    assert exact.selection_scores(x_in).dtype == torch.float32
    vals = torch.randn(B, K)
    assert exact.exact_values(x_in, torch.zeros(B, K, dtype=torch.long), vals) is vals


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_bf16_selection_values_are_exact_and_choice_near_optimal(arch):
    exact, approx = pair(arch)
    x = torch.randn(B, D)
    x_in = approx.encoder_input(x)
    assert approx.selection_scores(x_in).dtype == torch.bfloat16
    approx.train()
    out = approx(x)
    codes = out.codes
    pre = dense_pre(approx, x).detach()
    chosen = pre.gather(1, codes.idx)
    on = codes.vals != 0
    # Values are the fp32 pre-activations at the chosen latents, not their bf16 roundings.
    torch.testing.assert_close(codes.vals[on], chosen.relu()[on], rtol=1e-5, atol=1e-5)
    if arch == "topk":
        # Every chosen latent is within bf16 rounding of the exact k-th largest pre-activation.
        kth = pre.topk(K, dim=1).values[:, -1:]
        tol = 2 * 2**-8 * pre.abs().amax(dim=1, keepdim=True)
        assert bool((chosen >= kth - tol).all())
        ref = exact(x).codes
        same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ref.idx, codes.idx))
        assert same / (B * K) > 0.9
    else:
        # The batch-level cut runs on exact values: exactly k * B latents kept (no bf16 ties).
        assert int((codes.vals > 0).sum()) == K * B


def test_bf16_selection_gradients_match_dense_autograd_at_the_same_latents():
    _, approx = pair("topk")
    x = torch.randn(B, D)
    y = torch.randn(B, D)
    out = approx(x, y_BE=None)
    idx = out.codes.idx
    loss = ((out.x_hat - y) ** 2).sum()
    loss.backward()
    got = {n: p.grad.clone() for n, p in approx.named_parameters()}
    approx.zero_grad()
    vals = dense_pre(approx, x).gather(1, idx).relu()
    x_hat = (vals.unsqueeze(2) * approx.W_dec[idx]).sum(1) + approx.b_dec
    ((x_hat - y) ** 2).sum().backward()
    for n, p in approx.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-4, msg=n)


def test_auxk_uses_exact_values_under_bf16_selection():
    exact, approx = pair("topk")
    x = torch.randn(B, D)
    dead = torch.zeros(L, dtype=torch.bool)
    dead[: L // 2] = True
    a, b = exact(x, dead_mask=dead).losses, approx(x, dead_mask=dead).losses
    assert abs(a["auxk"].item() - b["auxk"].item()) < 0.02 * a["auxk"].item()


def test_unknown_selection_dtype_is_an_error():
    with pytest.raises(ValueError, match="selection_dtype"):
        build_sae(SAEConfig(architecture="topk", num_latents=L, k=K, selection_dtype="float16"), D)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_bf16_selection_works_under_inference_mode(arch):
    """Evaluation runs SAEs under torch.inference_mode; the exact values of bf16-selected latents
    must still be recomputed there (the eager gather once failed: autograd inside inference mode)."""
    _, approx = pair(arch)
    approx.eval()
    x = torch.randn(B, D)
    with torch.no_grad():
        ref = approx.encode(x)
    with torch.inference_mode():
        got = approx.encode(x)
        out = approx(x)
    assert torch.equal(got.idx, ref.idx) and torch.equal(got.vals, ref.vals)
    assert torch.isfinite(out.losses["fvu"])


@pytest.mark.parametrize("selection", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_an_encode_under_inference_mode_first_does_not_poison_later_ones(arch, selection):
    """A spliced evaluation may be the first to encode (under torch.inference_mode); the buffers it
    creates then (the CPU workspace, the bf16 copy of W_enc) must stay usable by a later encode
    outside it and by a training step (they were once inference tensors: in-place writes failed)."""
    sae = build_sae(SAEConfig(architecture=arch, num_latents=L, k=K, selection_dtype=selection), D, seed=0)
    fresh = build_sae(SAEConfig(architecture=arch, num_latents=L, k=K, selection_dtype=selection), D, seed=0)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        sae.encode(x)
    with torch.no_grad():
        got, want = sae.encode(x), fresh.encode(x)
    if arch == "topk":
        assert torch.equal(got.idx, want.idx) and torch.equal(got.vals, want.vals)
    else:
        assert torch.equal(got if isinstance(got, torch.Tensor) else got.vals,
                           want if isinstance(want, torch.Tensor) else want.vals)
    sae(x).losses["loss"].backward()
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all()
