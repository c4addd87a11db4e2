"""The TopK SAE backward allocates nothing of shape [batch, num_latents].

At B=512, L=16384 a [B, L] fp32 tensor is 32 MiB, 16x the largest legitimate gradient (W_enc/W_dec,
[L, D] fp32 = 2 MiB at D=32). Two detectors watch one training step (forward with AuxK active):

- ``saved_tensors_hooks``: no tensor saved for backward takes B*L bytes or more;
- a ``TorchDispatchMode`` around ``loss.backward()``: no op output takes B*L bytes or more, and
  the largest is at most an [L, D] fp32 gradient.

Bytes, not elements, because a [B, L] tensor of any dtype is the thing to rule out, and Triton's
interpreter copies kernel arguments as uint8 views of their storage (W's storage is L*D*4 bytes).
The Triton path runs in the interpreter at a smaller size where [B, L] still dominates.

A control runs the same detectors on autograd through ``torch.topk`` of dense pre-activations
(what the sparse kernels replace) and checks that both fire, so the tests can fail.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sae.models import build_sae
from sae.models.config import SAEConfig


class OutputSizes(TorchDispatchMode):
    """Records (op name, bytes) of every tensor produced by an aten op while active."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs.extend((str(func), nbytes(t)) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def largest(records: list[tuple[str, int]]) -> tuple[str, int]:
    return max(records, key=lambda r: r[1], default=("none", 0))


def run_step(loss_fn, *params: torch.Tensor):
    """Forward under saved_tensors_hooks, backward under OutputSizes.

    Returns (saved: list of (shape, bytes), produced in backward: list of (op, bytes)).
    """
    saved: list[tuple[tuple[int, ...], int]] = []

    def pack(t):
        saved.append((tuple(t.shape), nbytes(t)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    mode = OutputSizes()
    with mode:
        loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), "backward reached every parameter"
    return saved, mode.outputs


def topk_sae(B: int, L: int, D: int, K: int):
    cfg = SAEConfig(architecture="topk", num_latents=L, k=K, b_dec_init="zeros", k_aux=2 * K)
    sae = build_sae(cfg, D, seed=0)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(L, dtype=torch.bool)
    dead[::2] = True  # half the latents dead: the AuxK path runs too, over [B, L/2] pre-activations
    return sae, x, dead


SIZES = {"eager": (512, 16384, 32, 8), "triton": (64, 256, 4, 4)}  # (B, L, D, K); B*L >= 4 * L*D*4


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_topk_sae_backward_allocates_no_batch_by_latents_tensor(backend, request, monkeypatch):
    if backend == "triton":
        request.getfixturevalue("triton_ops")  # conftest.py: forces Triton, interpreted
    else:
        monkeypatch.setenv("SAE_KERNEL_BACKEND", "eager")
    B, L, D, K = SIZES[backend]
    sae, x, dead = topk_sae(B, L, D, K)

    def loss_fn():
        out = sae(x, dead_mask=dead)
        assert "auxk" in out.losses
        return out.losses["loss"]

    saved, produced = run_step(loss_fn, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    big_saved = [s for s in saved if s[1] >= B * L]
    assert not big_saved, f"tensors of >= B*L={B * L} bytes saved for backward: {big_saved}"
    op, size = largest(produced)
    assert size < B * L, f"backward produced {op} of {size} >= B*L={B * L} bytes"
    assert size <= L * D * 4, (op, size)  # at most a dense fp32 [L, D] weight gradient


def test_detectors_catch_dense_topk_autograd():
    B, L, D, K = SIZES["eager"]
    sae, x, _ = topk_sae(B, L, D, K)

    def dense_loss():
        pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        vals, idx = pre.relu().topk(K, dim=1)
        x_hat = (vals[:, :, None] * sae.W_dec[idx]).sum(1) + sae.b_dec
        return (x_hat - x).pow(2).sum()

    saved, produced = run_step(dense_loss, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    assert any(size >= B * L for _, size in saved), "the relu output [B, L] is saved for backward"
    op, size = largest(produced)
    assert size >= B * L, f"topk backward scatters into a dense [B, L] gradient; largest was {op} {size}"
