"""Eager (CPU and fallback) implementations of the three sparse primitives.

The TopK family needs three products with a sparse [B, L] matrix S that holds K non-zeros per
row (values ``vals_BK`` at columns ``idx_BK``):

- ``embed``:         ``out_BD  = S @ W_LD``          (sparse decode)
- ``gather_dot``:    ``out_BK  = <y_BD[b], W_LD[idx_BK[b, j]]>``   (grad of vals; encoder gather)
- ``scatter_outer``: ``out_LD  = S^T @ y_BD``        (grad of W_dec and W_enc)

All three cost O(B K D) instead of the dense O(B L D). On CPU the fastest stock kernels for them
are ``F.embedding_bag`` (mode="sum", per-sample weights) and its backward, which PyTorch
implements as segment sums without building a [B, K, D] or [B, L] tensor. Computation is done in
fp32 when inputs are in a lower precision, and results are cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def embed(idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_LD: torch.Tensor) -> torch.Tensor:
    """``out[b] = sum_j vals[b, j] * W[idx[b, j]]`` in the accumulation dtype (fp32 or fp64)."""
    W = _f32(W_LD)
    return F.embedding_bag(idx_BK, W, per_sample_weights=vals_BK.to(W.dtype), mode="sum")


def _embedding_bag_grads(
    idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_LD: torch.Tensor, y_BD: torch.Tensor,
    need_vals: bool, need_W: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    # Reuse embedding_bag's own backward: with grad_out = y it yields gather_dot (grad of the
    # per-sample weights) and scatter_outer (grad of the weight). Weight values never enter the
    # weight gradient, so any [L, D] tensor of the right dtype serves as W. Callers may sit in
    # torch.inference_mode (evaluation with bf16 selection): autograd runs outside it, on copies
    # of any inference tensors (autograd cannot save those).
    with torch.inference_mode(False), torch.enable_grad():
        idx_BK, vals_BK, W_LD, y_BD = (t.clone() if t.is_inference() else t for t in (idx_BK, vals_BK, W_LD, y_BD))
        W = _f32(W_LD).detach().requires_grad_(need_W)
        v = _f32(vals_BK).detach().to(W.dtype).requires_grad_(need_vals)
        out = F.embedding_bag(idx_BK, W, per_sample_weights=v, mode="sum")
        inputs = [t for t, need in ((v, need_vals), (W, need_W)) if need]
        grads = torch.autograd.grad(out, inputs, y_BD.to(W.dtype))
    it = iter(grads)
    return (next(it) if need_vals else None), (next(it) if need_W else None)


def gather_dot(y_BD: torch.Tensor, W_LD: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = <y[b], W[idx[b, j]]>``."""
    vals = torch.zeros(idx_BK.shape, dtype=torch.float32 if W_LD.dtype != torch.float64 else W_LD.dtype,
                       device=idx_BK.device)
    g, _ = _embedding_bag_grads(idx_BK, vals, W_LD, y_BD, need_vals=True, need_W=False)
    return g


def scatter_outer(idx_BK: torch.Tensor, vals_BK: torch.Tensor, y_BD: torch.Tensor, num_rows: int,
                  like_LD: torch.Tensor) -> torch.Tensor:
    """``out[l] = sum_{b, j : idx[b, j] = l} vals[b, j] * y[b]``, shape ``[num_rows, D]``.

    Duplicate indices in a row add up. ``like_LD`` supplies dtype/device (values unused).
    """
    assert like_LD.shape[0] == num_rows
    _, gW = _embedding_bag_grads(idx_BK, vals_BK, like_LD, y_BD, need_vals=False, need_W=True)
    return gW


def decode_backward(
    grad_BD: torch.Tensor, idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_LD: torch.Tensor,
    need_vals: bool, need_W: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both gradients of :func:`embed` from a single embedding_bag backward."""
    return _embedding_bag_grads(idx_BK, vals_BK, W_LD, grad_BD, need_vals, need_W)
