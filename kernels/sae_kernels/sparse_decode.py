"""Sparse decode: ``x_hat_BD = sum_j vals_BK[:, j] * W_dec_LD[idx_BK[:, j]] (+ b_dec_D)``.

Math (S is the sparse [B, L] code matrix with K non-zeros per row):
    forward          x_hat   = S W_dec
    backward, vals   g_vals[b, j] = <g_out[b], W_dec[idx[b, j]]>       (gather_dot)
    backward, W_dec  g_W_dec      = S^T g_out                          (scatter_outer)

Memory traffic: forward and both backward products read B*K rows of W_dec (or write B*K row
contributions) and B rows of activations: O(B K D) bytes, against O(B L D) FLOPs and an
O(B L) dense code matrix for the dense product. Nothing of shape [B, L] is allocated.

The autograd Function dispatches each product to the Triton kernels (CUDA, or the interpreter)
or to the eager ``embedding_bag`` path (:mod:`.eager`), see :mod:`.dispatch`.
"""

from __future__ import annotations

import torch

from . import eager
from .dispatch import Backend, resolve_backend


def _ops(device: torch.device):
    if resolve_backend(device) is Backend.TRITON:
        from . import triton_ops

        return triton_ops
    return eager


def check_sparse_args(idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_LD: torch.Tensor) -> None:
    if idx_BK.shape != vals_BK.shape or idx_BK.dim() != 2:
        raise ValueError(f"idx and vals must both be [B, K]; got {tuple(idx_BK.shape)} and {tuple(vals_BK.shape)}")
    if idx_BK.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be int32/int64, got {idx_BK.dtype}")
    if W_LD.dim() != 2:
        raise ValueError(f"weight must be [L, D], got shape {tuple(W_LD.shape)}")
    if idx_BK.device != W_LD.device or vals_BK.device != W_LD.device:
        raise ValueError(f"idx ({idx_BK.device}), vals ({vals_BK.device}) and W ({W_LD.device}) must share a device")


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_LD: torch.Tensor) -> torch.Tensor:
        ops = _ops(W_LD.device)
        out = ops.embed(idx_BK, vals_BK, W_LD)
        ctx.save_for_backward(idx_BK, vals_BK, W_LD)
        ctx.ops = ops
        return out.to(torch.promote_types(vals_BK.dtype, W_LD.dtype))

    @staticmethod
    def backward(ctx, grad_BD: torch.Tensor):
        idx_BK, vals_BK, W_LD = ctx.saved_tensors
        need_vals, need_W = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        g_vals, g_W = ctx.ops.decode_backward(grad_BD.contiguous(), idx_BK, vals_BK, W_LD, need_vals, need_W)
        return (
            None,
            g_vals.to(vals_BK.dtype) if g_vals is not None else None,
            g_W.to(W_LD.dtype) if g_W is not None else None,
        )


def sparse_decode(idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_dec_LD: torch.Tensor,
                  b_dec_D: torch.Tensor | None = None) -> torch.Tensor:
    """Decode sparse codes. Returns ``[B, D]`` in ``promote(vals.dtype, W_dec.dtype)``.

    Raises:
        ValueError: shapes, dtypes or devices do not fit together.
    """
    check_sparse_args(idx_BK, vals_BK, W_dec_LD)
    out = SparseDecode.apply(idx_BK, vals_BK, W_dec_LD)
    return out if b_dec_D is None else out + b_dec_D


def reference_decode(idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_dec_LD: torch.Tensor,
                     b_dec_D: torch.Tensor | None = None) -> torch.Tensor:
    """Dense reference: scatter codes into [B, L] and multiply. For tests only."""
    S = torch.zeros(idx_BK.shape[0], W_dec_LD.shape[0], dtype=vals_BK.dtype, device=vals_BK.device)
    S = S.scatter_add(1, idx_BK.long(), vals_BK)
    out = S @ W_dec_LD.to(vals_BK.dtype)
    return out if b_dec_D is None else out + b_dec_D
