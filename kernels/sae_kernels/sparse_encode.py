"""Sparse encoder gradient for the TopK family.

The encoder computes dense pre-activations ``pre_BL = x_BD W_enc_LD^T + b_enc_L`` without
autograd, selects ``idx_BK`` (top-k after ReLU), and returns ``vals_BK = pre[b, idx[b, j]]``
through :func:`gather_encode`, whose backward is sparse:

    g_W_enc = S^T x          (scatter_outer: [L, D], only rows that fired are non-zero)
    g_b_enc = S^T 1          (index_add of g_vals)
    g_x     = S W_enc        (embed; only when x requires grad)

where S is the [B, L] matrix holding ``g_vals_BK`` at ``idx_BK``. Autograd through
``torch.topk`` would instead scatter into a dense [B, L] gradient and run a dense
[L, B] x [B, D] matmul: O(B L D) FLOPs and O(B L) memory, against O(B K D) and O(B K) here.
"""

from __future__ import annotations

import torch

from .sparse_decode import _ops, check_sparse_args


class GatherEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD: torch.Tensor, W_enc_LD: torch.Tensor, b_enc_L: torch.Tensor,
                idx_BK: torch.Tensor, vals_BK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_BD, W_enc_LD, idx_BK)
        ctx.b_enc_dtype = b_enc_L.dtype
        ctx.ops = _ops(W_enc_LD.device)
        return vals_BK.clone()

    @staticmethod
    def backward(ctx, g_vals_BK: torch.Tensor):
        x_BD, W_enc_LD, idx_BK = ctx.saved_tensors
        ops = ctx.ops
        g_vals_BK = g_vals_BK.contiguous()
        g_x = g_W = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = ops.embed(idx_BK, g_vals_BK, W_enc_LD).to(x_BD.dtype)
        if ctx.needs_input_grad[1]:
            g_W = ops.scatter_outer(idx_BK, g_vals_BK, x_BD, W_enc_LD.shape[0], W_enc_LD).to(W_enc_LD.dtype)
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(W_enc_LD.shape[0], dtype=torch.float32, device=g_vals_BK.device)
            g_b.index_add_(0, idx_BK.reshape(-1).long(), g_vals_BK.reshape(-1).float())
            g_b = g_b.to(ctx.b_enc_dtype)
        return g_x, g_W, g_b, None, None


def gather_encode(x_BD: torch.Tensor, W_enc_LD: torch.Tensor, b_enc_L: torch.Tensor,
                  idx_BK: torch.Tensor, vals_BK: torch.Tensor) -> torch.Tensor:
    """Attach the sparse encoder gradient to precomputed top-k pre-activations.

    Args:
        x_BD: encoder input (after any pre-encoder bias subtraction).
        W_enc_LD, b_enc_L: encoder weight and bias.
        idx_BK: selected latents.
        vals_BK: ``(x W_enc^T + b_enc)[b, idx[b, j]]`` computed without autograd.

    Returns:
        ``vals_BK`` (a copy) with gradients flowing to x, W_enc and b_enc sparsely.
    """
    check_sparse_args(idx_BK, vals_BK, W_enc_LD)
    if x_BD.shape[-1] != W_enc_LD.shape[1]:
        raise ValueError(f"x has d={x_BD.shape[-1]} but W_enc has d={W_enc_LD.shape[1]}")
    return GatherEncode.apply(x_BD, W_enc_LD, b_enc_L, idx_BK, vals_BK)


@torch.no_grad()
def gather_pre_activations(x_BD: torch.Tensor, W_enc_LD: torch.Tensor, b_enc_L: torch.Tensor,
                           idx_BK: torch.Tensor) -> torch.Tensor:
    """``(x W_enc^T + b_enc)[b, idx[b, j]]`` in fp32 at O(B K D) cost, without autograd.

    Recomputes exact values for latents selected from lower-precision pre-activations.
    """
    if x_BD.shape[-1] != W_enc_LD.shape[1]:
        raise ValueError(f"x has d={x_BD.shape[-1]} but W_enc has d={W_enc_LD.shape[1]}")
    vals = _ops(W_enc_LD.device).gather_dot(x_BD, W_enc_LD, idx_BK)
    return vals.float() + b_enc_L.float()[idx_BK.long()]


def reference_gather_encode(x_BD: torch.Tensor, W_enc_LD: torch.Tensor, b_enc_L: torch.Tensor,
                            idx_BK: torch.Tensor) -> torch.Tensor:
    """Dense reference: full pre-activations with autograd, then gather. For tests only."""
    pre = x_BD @ W_enc_LD.T + b_enc_L
    return pre.gather(1, idx_BK.long())
