"""Eager (CPU and fallback) versions of the fused-step primitives of :mod:`.triton_fused`.

Same signatures and results up to fp32 summation order. On CPU the decode and the two weight
gradients reuse ``F.embedding_bag`` and its backward (:mod:`.eager`), which never build a
[B, L] tensor; the Adam update is the same formula as the Triton kernel, in torch ops.
"""

from __future__ import annotations

import torch

from . import eager


def decode_error(idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_LE: torch.Tensor, bias_E: torch.Tensor | None,
                 offset_BE: torch.Tensor | None, y_BE: torch.Tensor | None):
    """See :func:`sae_kernels.triton_fused.decode_error`."""
    x_hat = eager.embed(idx_BK, vals_BK, W_LE)
    if bias_E is not None:
        x_hat = x_hat + bias_E.to(x_hat.dtype)
    if offset_BE is not None:
        x_hat = x_hat + offset_BE.to(x_hat.dtype)
    if y_BE is None:
        return x_hat, None, None
    e = x_hat - y_BE.to(x_hat.dtype)
    return x_hat, eager.gather_dot(e, W_LE, idx_BK).to(x_hat.dtype), e.pow(2).sum(1)


def scatter_pair(idx_BK: torch.Tensor, num_rows: int, a_BK: torch.Tensor | None, xa_BD: torch.Tensor | None,
                 c_BK: torch.Tensor | None, yc_BE: torch.Tensor | None, *, bias_grad: bool = False):
    """See :func:`sae_kernels.triton_fused.scatter_pair`."""
    idx = idx_BK.long()
    G_a = g_bias = G_c = None
    if a_BK is not None:
        like = torch.empty(num_rows, xa_BD.shape[1], dtype=torch.promote_types(a_BK.dtype, xa_BD.dtype),
                           device=xa_BD.device)
        G_a = eager.scatter_outer(idx, a_BK, xa_BD, num_rows, like)
        if bias_grad:
            g_bias = torch.zeros(num_rows, dtype=G_a.dtype, device=G_a.device)
            g_bias.index_add_(0, idx.reshape(-1), a_BK.reshape(-1).to(G_a.dtype))
    if c_BK is not None:
        like = torch.empty(num_rows, yc_BE.shape[1], dtype=torch.promote_types(c_BK.dtype, yc_BE.dtype),
                           device=yc_BE.device)
        G_c = eager.scatter_outer(idx, c_BK, yc_BE, num_rows, like)
    return G_a, g_bias, G_c


def row_grad_stats(g_LD: torch.Tensor, W_LD: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """See :func:`sae_kernels.triton_fused.row_grad_stats`."""
    g = g_LD.float()
    gg = g.pow(2).sum(1)
    if W_LD is None:
        return None, gg
    w = W_LD.float()
    dot = (g * w).sum(1)
    return dot, (gg - 2 * dot * dot + dot * dot * w.pow(2).sum(1)).clamp_min(0.0)


def _adam(p, g, m, v, coef, beta1, beta2, step_size, bc2_sqrt, eps):
    if isinstance(step_size, torch.Tensor):  # [step_size, bc2_sqrt] on the device
        step_size, bc2_sqrt = step_size[0], step_size[1]
    g = g.float() * coef.float()
    m32 = m.float().lerp(g, 1.0 - beta1)
    v32 = v.float().mul(beta2).addcmul(g, g, value=1.0 - beta2)
    p32 = p.float() - step_size * (m32 / (v32.sqrt() / bc2_sqrt + eps))
    return p32, m32, v32


def _store(p, m, v, shadow, p32, m32, v32):
    p.copy_(p32)
    m.copy_(m32)
    v.copy_(v32)
    if shadow is not None:
        shadow.copy_(p32)


def adam_flat_(p, g, m, v, coef, *, beta1, beta2, step_size, bc2_sqrt, eps, shadow=None) -> None:
    """See :func:`sae_kernels.triton_fused.adam_flat_`."""
    _store(p, m, v, shadow, *_adam(p, g, m, v, coef, beta1, beta2, step_size, bc2_sqrt, eps))


def adam_rows_(p, g, m, v, coef, dot, *, renorm, beta1, beta2, step_size, bc2_sqrt, eps, norm_eps,
               shadow=None) -> None:
    """See :func:`sae_kernels.triton_fused.adam_rows_`."""
    if dot is not None:
        g = g.float() - dot.float().unsqueeze(1) * p.float()
    p32, m32, v32 = _adam(p, g, m, v, coef, beta1, beta2, step_size, bc2_sqrt, eps)
    if renorm:
        p32 = p32 / p32.norm(dim=1, keepdim=True).clamp_min(norm_eps)
    _store(p, m, v, shadow, p32, m32, v32)
