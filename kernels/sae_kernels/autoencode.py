"""The whole sparse autoencoder of the TopK family as one autograd Function, with its loss.

Given the selected latents ``idx_BK`` and their exact pre-activations ``pre_BK`` (computed
without autograd), :func:`sparse_autoencode` returns

    vals   = relu(pre)                                         [B, K]  the codes
    x_hat  = sum_j vals[:, j] W_dec[idx[:, j]] + b_dec + offset [B, E]
    err_sq = sum ||x_hat - y||^2                                scalar  (0 without a target)

and its backward treats ``pre`` as ``((x - b_pre) W_enc^T + b_enc)[b, idx[b, j]]``:

    g_x_hat = g_x_hat_out + 2 g_err (x_hat - y)
    g_vals  = g_vals_out + 2 g_err <x_hat - y, W_dec[idx]> + <g_x_hat_out, W_dec[idx]>
    g_pre   = g_vals * (pre > 0)
    g_W_dec = S_vals^T g_x_hat      g_W_enc = S_gpre^T (x - b_pre)      g_b_enc[l] = sum of g_pre at l
    g_b_dec = sum_b g_x_hat[b]      g_b_pre = -g_b_enc W_enc            g_offset = g_x_hat

Against the chain ``gather_encode -> relu -> sparse_decode -> fvu`` this saves, per step: one of
the two reads of the B*K selected decoder rows (:func:`decode_error` produces the error dots in the
forward pass), one index sort (both weight gradients come from one CSR, :func:`scatter_pair`),
the dense [B, D] input gradient when only ``b_pre`` needs it (``g_b_pre`` is a GEMV over W_enc,
``L D`` reads instead of ``B K D``), and the atomics of the b_enc gradient (deterministic sums).

On the eager backend (CPU) :func:`sparse_autoencode` is the chain of the per-op Functions itself
(``gather_encode -> relu -> sparse_decode``, squared error by autograd): on CPU it is as fast, and
an exact fp32 run stays bitwise what it was before this Function existed.

Shape legend: B tokens, D d_in, E d_out, L latents, K slots per token.
"""

from __future__ import annotations

import torch

from . import eager_fused
from .dispatch import Backend, resolve_backend
from .sparse_decode import _ops, check_sparse_args, sparse_decode
from .sparse_encode import gather_encode


def fused_ops(device: torch.device):
    """:mod:`.triton_fused` or :mod:`.eager_fused` for tensors on ``device`` (see :mod:`.dispatch`)."""
    if resolve_backend(device) is Backend.TRITON:
        from . import triton_fused

        return triton_fused
    return eager_fused


class SparseAutoencode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, b_pre_D, idx_BK, pre_BK, W_enc_LD, b_enc_L, W_dec_LE, b_dec_E, offset_BE, y_BE):
        ops = fused_ops(W_dec_LE.device)
        vals = pre_BK.relu()
        x_hat, dots, err_sq = ops.decode_error(idx_BK, vals, W_dec_LE, b_dec_E, offset_BE, y_BE)
        err = err_sq.sum() if err_sq is not None else x_hat.new_zeros(())
        ctx.save_for_backward(x_BD, b_pre_D, idx_BK, pre_BK, W_enc_LD, W_dec_LE, x_hat, dots, y_BE)
        ctx.dtypes = [t.dtype if t is not None else None for t in (x_BD, b_pre_D, b_enc_L, b_dec_E, offset_BE)]
        ctx.set_materialize_grads(False)
        return vals, x_hat, err

    @staticmethod
    def backward(ctx, g_vals_out, g_xhat_out, g_err):
        x, b_pre, idx, pre, W_enc, W_dec, x_hat, dots, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        ops = fused_ops(W_dec.device)
        acc = x_hat.dtype
        # Gradient on x_hat and on the codes, from each output that received one.
        g_xhat = g_xhat_out.to(acc) if g_xhat_out is not None else None
        g_vals = g_vals_out.to(acc) if g_vals_out is not None else None
        if g_err is not None and y is not None:
            two_g = 2 * g_err.to(acc)
            g_from_err = (x_hat - y.to(acc)) * two_g
            g_xhat = g_from_err if g_xhat is None else g_xhat + g_from_err
            g_vals = dots * two_g if g_vals is None else g_vals + dots * two_g
        if g_xhat_out is not None:
            gd = _ops(W_dec.device).gather_dot(g_xhat_out.contiguous(), W_dec, idx).to(acc)
            g_vals = gd if g_vals is None else g_vals + gd
        if g_xhat is None and g_vals is None:
            return (None,) * 10
        L = W_enc.shape[0]
        g_pre = g_vals * (pre > 0) if g_vals is not None else None
        want_enc = g_pre is not None and (need[4] or need[5] or need[1])
        want_dec = g_xhat is not None and need[6]
        x_in = x - b_pre if b_pre is not None else x
        G_enc, g_b_enc, G_dec = ops.scatter_pair(
            idx, L, g_pre if want_enc else None, x_in if want_enc else None,
            pre.relu() if want_dec else None, g_xhat if want_dec else None, bias_grad=need[5] or need[1],
        )
        dt = ctx.dtypes
        g_x = g_b_pre = g_b_dec = g_offset = g_y = None
        if need[0] and g_pre is not None:
            g_x = _ops(W_enc.device).embed(idx, g_pre, W_enc).to(dt[0])
        if need[1] and g_b_enc is not None:
            g_b_pre = -(g_b_enc.to(W_enc.dtype) @ W_enc).to(dt[1])
        if g_xhat is not None:
            if need[7]:
                g_b_dec = g_xhat.sum(0).to(dt[3])
            if need[8]:
                g_offset = g_xhat.to(dt[4])
        if need[9] and g_err is not None and y is not None:
            g_y = ((x_hat - y.to(acc)) * (-2 * g_err.to(acc))).to(y.dtype)
        return (
            g_x, g_b_pre, None, None,
            G_enc.to(W_enc.dtype) if need[4] and G_enc is not None else None,
            g_b_enc.to(dt[2]) if need[5] and g_b_enc is not None else None,
            G_dec.to(W_dec.dtype) if G_dec is not None else None,
            g_b_dec, g_offset, g_y,
        )


def sparse_autoencode(x_BD: torch.Tensor, idx_BK: torch.Tensor, pre_BK: torch.Tensor, W_enc_LD: torch.Tensor,
                      b_enc_L: torch.Tensor, W_dec_LE: torch.Tensor, b_dec_E: torch.Tensor | None = None, *,
                      b_pre_D: torch.Tensor | None = None, x_in_BD: torch.Tensor | None = None,
                      offset_BE: torch.Tensor | None = None,
                      y_BE: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, reconstruction and squared error of a sparse autoencoder with given selections.

    Args:
        x_BD: encoder input before the pre-encoder bias.
        idx_BK: selected latents; pre_BK: their pre-activations ``((x - b_pre) W_enc^T + b_enc)``
            at ``idx``, computed without autograd (slots with ``pre <= 0`` are inactive).
        W_enc_LD, b_enc_L, W_dec_LE, b_dec_E: the autoencoder's weights (``b_dec`` may be None).
        b_pre_D: subtracted from ``x`` before encoding (an SAE's ``b_dec``), or None.
        x_in_BD: ``x - b_pre`` when the caller built it already (with autograd); the eager chain
            reuses that node, so gradients accumulate exactly as in the per-op chain.
        offset_BE: added to the reconstruction (a skip transcoder's ``x W_skip^T``), or None.
        y_BE: the target; without it ``err_sq`` is 0.

    Returns:
        ``(vals_BK, x_hat_BE, err_sq)``; ``x_hat`` and ``err_sq`` in fp32 (fp64 for fp64 weights).

    Raises:
        ValueError: shapes or devices do not fit together.
    """
    check_sparse_args(idx_BK, pre_BK, W_dec_LE)
    check_sparse_args(idx_BK, pre_BK, W_enc_LD)
    B, D = x_BD.shape
    E = W_dec_LE.shape[1]
    if W_enc_LD.shape != (W_dec_LE.shape[0], D) or b_enc_L.shape != (W_enc_LD.shape[0],):
        raise ValueError(f"W_enc {tuple(W_enc_LD.shape)}, b_enc {tuple(b_enc_L.shape)} and W_dec "
                         f"{tuple(W_dec_LE.shape)} do not fit x with d={D}")
    for name, t, shape in (("b_pre", b_pre_D, (D,)), ("b_dec", b_dec_E, (E,)), ("offset", offset_BE, (B, E)),
                           ("y", y_BE, (B, E))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if resolve_backend(W_dec_LE.device) is Backend.TRITON:
        return SparseAutoencode.apply(x_BD, b_pre_D, idx_BK, pre_BK, W_enc_LD, b_enc_L, W_dec_LE, b_dec_E,
                                      offset_BE, y_BE)
    if x_in_BD is None:
        x_in_BD = x_BD - b_pre_D if b_pre_D is not None else x_BD
    vals = gather_encode(x_in_BD, W_enc_LD, b_enc_L, idx_BK, pre_BK).relu()
    x_hat = sparse_decode(idx_BK, vals, W_dec_LE, b_dec_E)
    if offset_BE is not None:
        x_hat = x_hat + offset_BE
    err = (x_hat.float() - y_BE.float()).pow(2).sum() if y_BE is not None else x_hat.new_zeros(())
    return vals, x_hat, err


def reference_autoencode(x_BD, idx_BK, W_enc_LD, b_enc_L, W_dec_LE, b_dec_E=None, *, b_pre_D=None, offset_BE=None,
                         y_BE=None):
    """Dense reference with autograd through every input: full [B, L] pre-activations and codes.
    For tests only."""
    x_in = x_BD - b_pre_D if b_pre_D is not None else x_BD
    pre = x_in @ W_enc_LD.T + b_enc_L
    vals = pre.gather(1, idx_BK.long()).relu()
    S = torch.zeros_like(pre).scatter_add(1, idx_BK.long(), vals)
    x_hat = S @ W_dec_LE
    if b_dec_E is not None:
        x_hat = x_hat + b_dec_E
    if offset_BE is not None:
        x_hat = x_hat + offset_BE
    err = (x_hat - y_BE).pow(2).sum() if y_BE is not None else x_hat.new_zeros(())
    return vals, x_hat, err

