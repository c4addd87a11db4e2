"""Sparse JumpReLU: the entries of the pre-activation matrix that can carry gradient, as bags of
slots, and the JumpReLU straight-through estimators evaluated on those slots only.

JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead", eqs. 11-12), per entry of the [B, L] matrix:

    z = relu(pre),   f = z H(z - theta),   l0 = mean_b sum_i H(z - theta)
    df/dpre    = H(z - theta) (pre > 0)               (active entries: z > theta)
    df/dtheta ~= -(theta / eps) rect((z - theta) / eps)  (band entries: |z - theta| < eps / 2)
    dH/dtheta ~= -(1 / eps) rect((z - theta) / eps)

Every other entry has zero gradient for every parameter. So after the dense pre-activations are
computed without autograd, :func:`threshold_select` keeps the entries with ``pre > floor[i]``, where
``floor`` (:func:`candidate_floor`) sits just under ``theta - eps / 2`` (a superset of active and
band entries), as slots ``(vals_NK, idx_NK, valid_NK)``: bags of K slots, ``token_N`` naming each
bag's token. The count per token varies (JumpReLU has no fixed k; some tokens fire many times the
mean), so a token spreads over ``ceil(n / K)`` bags and K (:func:`bag_width`) trades padding against
rows, instead of padding every token to the largest count. :func:`jumprelu_slots` maps slot
pre-activations to codes ``f`` and the L0 term with the backward above: ``g_pre = g_f H`` per slot,
``g_theta`` summed over band slots only (index_add). The slot pre-activations carry their sparse
encoder gradient through :func:`sae_kernels.gather_encode` (on the bags' gathered inputs) and the
codes decode through :func:`sae_kernels.sparse_decode` (bag rows summed per token), whose backward
yields ``dL/df = <dL/dx_hat, W_dec[i]>`` at every slot, band slots included.

Memory traffic: the [B, L] pre-activations are read once by the comparison (a [B, L] bool mask is
written) and the mask once by the compaction (``nonzero``); everything after is O(N K) slots
(about the number of kept entries) and O(N K D) sparse products, against the dense path's [B, L]
autograd graph (several [B, L] tensors saved, a [B, L] gradient and an O(B L D) backward GEMM).

Plain PyTorch ops, on any device. On CUDA the compaction (``nonzero``) and the sizes derived from it
(bag width, bag count, the widest token) make the host wait a few times per step.

Known limits: ``token_codes`` (the codes ``forward`` returns) pads every token to the busiest
token's count, so one token that keeps most latents costs a [B, L]-sized buffer; and a latent
whose threshold sits below half the bandwidth keeps its whole column in the band, at about 50
bytes per kept entry against 4 for the dense path's [B, L] floats.
Shape legend: B tokens, L latents, N bags, K slots per bag, M entries per token (at most).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Relative margin under ``theta - eps / 2``: far above the rounding of the rect's argument
#: ``(z - theta) / eps`` (about 1e-7 relative), so no band entry is ever left out.
FLOOR_MARGIN = 1e-4


class ThresholdSlots(NamedTuple):
    """Entries above per-latent floors, in bags of K slots: a token's entries fill
    ``ceil(n / K)`` consecutive bags (in increasing latent order), the last one padded."""

    vals: torch.Tensor
    """[N, K] pre-activation of each kept entry (0 in padding slots)."""
    idx: torch.Tensor
    """[N, K] int64 latent of each kept entry (in padding slots, the bag's first latent again)."""
    valid: torch.Tensor
    """[N, K] bool, False in padding slots."""
    token: torch.Tensor
    """[N] int64 token (row of ``pre``) of each bag, non-decreasing."""


def candidate_floor(theta_L: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-latent floor under which an entry ``pre`` is neither active nor in the band.

    ``z = relu(pre) > theta - eps/2`` is needed to be active or in the band; the floor is slightly
    lower (:data:`FLOOR_MARGIN`, then one float step down after rounding). Where the floor is
    negative every entry qualifies (``z >= 0``), so it becomes ``-inf``.
    """
    theta = theta_L.detach().double()
    floor = (theta - 0.5 * eps * (1 + FLOOR_MARGIN)).to(theta_L.dtype)
    floor = torch.nextafter(floor, torch.full_like(floor, -float("inf")))
    return floor.masked_fill(floor < 0, -float("inf"))


#: Cost of one bag (a gathered input row and a reconstruction row, forward and backward) in
#: units of one slot, for :func:`bag_width`. Measured on a 2-core CPU at d=384, 16x, L0 ~ 32 (counts
#: per token: mean 39, max 93): widths 24 and 48 step equally fast, 12 is 6% and 96 (every token in
#: one bag) 15% slower; 8 picks 48 there.
BAG_OVERHEAD = 8


def bag_width(counts_B: torch.Tensor, overhead: float = BAG_OVERHEAD) -> int:
    """The bag width K minimising ``sum_b ceil(n_b / K) (K + overhead)``: padding every token to
    the largest count wastes most slots when counts vary (a few tokens fire far more latents than
    the mean), and narrow bags cost a row each. Candidates are 4 and powers of two times 1 or 1.5."""
    top = max(int(counts_B.max()), 1) if counts_B.numel() else 1
    widths = sorted({w for p in range(2, top.bit_length() + 1) for w in (2**p, 3 * 2 ** (p - 1)) if w < top} | {top})
    w = torch.tensor(widths, device=counts_B.device)
    bags = (counts_B.unsqueeze(1) + w - 1) // w  # [B, C]
    cost = (bags * (w + overhead)).sum(0)
    return widths[int(cost.argmin())]


@torch.no_grad()
def threshold_select(pre_BL: torch.Tensor, floor_L: torch.Tensor, width: int | None = None) -> ThresholdSlots:
    """Every entry with ``pre[b, i] > floor[i]``, in bags of ``width`` slots (:class:`ThresholdSlots`).

    Args:
        pre_BL: dense pre-activations (no autograd).
        floor_L: per-latent floor (``-inf`` keeps the whole column).
        width: slots per bag; default :func:`bag_width` of the counts per token.

    Returns:
        :class:`ThresholdSlots`; at least one bag (all padding when nothing is kept).

    Raises:
        ValueError: shapes or devices do not fit together.
    """
    if pre_BL.dim() != 2 or floor_L.shape != (pre_BL.shape[1],):
        raise ValueError(f"pre must be [B, L] and floor [L]; got {tuple(pre_BL.shape)} and {tuple(floor_L.shape)}")
    if floor_L.device != pre_BL.device:
        raise ValueError(f"pre ({pre_BL.device}) and floor ({floor_L.device}) must share a device")
    if width is not None and width < 1:
        raise ValueError(f"width={width} must be >= 1")
    B, L = pre_BL.shape
    dev = pre_BL.device
    # Not ``pre <= floor``: a NaN pre-activation stays a candidate and reaches the loss, as on the
    # dense path (where the trainer's non-finite check stops the run), instead of silently dying.
    flat = torch.le(pre_BL, floor_L).logical_not_().view(-1).nonzero().squeeze(1)  # row-major: by token
    rows = flat // L
    cols = flat - rows * L
    counts = torch.bincount(rows, minlength=B)
    K = width or bag_width(counts)
    bags_per_token = (counts + K - 1) // K
    if flat.numel() == 0:  # one all-padding bag keeps every shape non-empty
        bags_per_token[0] = 1
    N = int(bags_per_token.sum())
    rank = torch.arange(flat.numel(), device=dev) - (counts.cumsum(0) - counts)[rows]  # within its token
    slot = ((bags_per_token.cumsum(0) - bags_per_token)[rows] + rank // K) * K + rank % K
    idx = torch.zeros(N * K, dtype=torch.int64, device=dev)
    vals = torch.zeros(N * K, dtype=pre_BL.dtype, device=dev)
    valid = torch.zeros(N * K, dtype=torch.bool, device=dev)
    idx[slot] = cols
    vals[slot] = pre_BL.reshape(-1)[flat]
    valid[slot] = True
    idx, valid = idx.view(N, K), valid.view(N, K)
    # Padding repeats the bag's first latent: a row already read, and no one huge index segment
    # (latent 0) for the sorts of the scatter backward.
    idx = torch.where(valid, idx, idx[:, :1])
    token = torch.repeat_interleave(torch.arange(B, device=dev), bags_per_token)
    return ThresholdSlots(vals.view(N, K), idx, valid, token)


def token_codes(f_NK: torch.Tensor, slots: ThresholdSlots, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero values of ``f_NK`` (codes on the slots of ``slots``) per token, as
    ``(vals_BM, idx_BM)`` in increasing latent order, M = the most of one token (at least 1);
    0 past each token's entries. Autograd flows back to ``f``."""
    N, K = f_NK.shape
    with torch.no_grad():
        src = (f_NK != 0).view(-1).nonzero().squeeze(1)  # bags are in token order: sorted by token
        tok = slots.token[src // K]
        counts = torch.bincount(tok, minlength=num_tokens)
        M = max(int(counts.max()), 1) if num_tokens > 0 else 1
        dst = tok * M + torch.arange(src.numel(), device=src.device) - (counts.cumsum(0) - counts)[tok]
        idx = torch.zeros(num_tokens * M, dtype=torch.int64, device=src.device)
        idx[dst] = slots.idx.view(-1)[src]
    vals = f_NK.new_zeros(num_tokens * M).index_copy(0, dst, f_NK.reshape(-1)[src])
    return vals.view(num_tokens, M), idx.view(num_tokens, M)


def rect(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel: 1 on (-1/2, 1/2), else 0 (in ``u``'s dtype)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_BK, theta_L, idx_BK, valid_BK, eps, num_tokens):
        z = pre_BK.relu()
        th = theta_L[idx_BK]
        # The expressions of the dense estimators (sae.models.jumprelu), entry by entry.
        active = (z > th) & valid_BK
        band = rect((z - th) / eps).bool() & valid_BK
        f = z * active
        # The dense sum(-1).mean(): counts are exact (in at least fp32: bf16 under autocast would round them).
        l0 = active.to(torch.promote_types(z.dtype, torch.float32)).sum() / num_tokens
        ctx.save_for_backward(active, band, th, idx_BK)
        ctx.eps, ctx.num_tokens, ctx.num_latents, ctx.theta_dtype = eps, num_tokens, theta_L.shape[0], theta_L.dtype
        ctx.set_materialize_grads(False)
        return f, l0

    @staticmethod
    def backward(ctx, g_f, g_l0):
        active, band, th, idx = ctx.saved_tensors
        eps = ctx.eps
        g_pre = g_f * active if g_f is not None and ctx.needs_input_grad[0] else None
        g_theta = None
        if ctx.needs_input_grad[1] and (g_f is not None or g_l0 is not None):
            pos = band.view(-1).nonzero().squeeze(1)
            th_b, idx_b = th.reshape(-1)[pos], idx.reshape(-1)[pos]
            g_band = torch.zeros_like(th_b)
            if g_f is not None:
                g_band += -(th_b / eps) * g_f.reshape(-1)[pos].to(th_b.dtype)
            if g_l0 is not None:
                g_band += -(1.0 / eps) * (g_l0.to(th_b.dtype) / ctx.num_tokens)
            g_theta = torch.zeros(ctx.num_latents, dtype=th_b.dtype, device=th_b.device)
            g_theta.index_add_(0, idx_b, g_band)
            g_theta = g_theta.to(ctx.theta_dtype)
        return g_pre, g_theta, None, None, None, None


def jumprelu_slots(pre_BK: torch.Tensor, theta_L: torch.Tensor, idx_BK: torch.Tensor, valid_BK: torch.Tensor,
                   eps: float, num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """JumpReLU codes and L0 of slots, with the rectangle-kernel STEs for ``theta``.

    Args:
        pre_BK: slot pre-activations (with the encoder gradient attached, e.g. by ``gather_encode``).
        theta_L: thresholds (> 0), with autograd.
        idx_BK, valid_BK: slot latents and validity (:func:`threshold_select`).
        eps: STE bandwidth.
        num_tokens: tokens the slots come from (the L0 is per token); default B, one row per token.

    Returns:
        ``(f_BK, l0)``: codes ``relu(pre) H(relu(pre) - theta[idx])`` (0 in padding slots) and
        ``#active / num_tokens`` (a scalar). The backward gives ``pre`` the gradient of ``f`` on active
        slots and ``theta`` the STE gradients of ``f`` and ``l0`` summed over valid band slots;
        slots must include every active and band entry for these to equal the dense ones.

    Raises:
        ValueError: shapes or devices do not fit together.
    """
    if pre_BK.dim() != 2 or idx_BK.shape != pre_BK.shape or valid_BK.shape != pre_BK.shape:
        raise ValueError(f"pre, idx and valid must all be [B, K]; got {tuple(pre_BK.shape)}, "
                         f"{tuple(idx_BK.shape)} and {tuple(valid_BK.shape)}")
    if theta_L.dim() != 1 or not (pre_BK.device == idx_BK.device == theta_L.device):
        raise ValueError(f"theta must be [L] on the slots' device; got {tuple(theta_L.shape)} on {theta_L.device}")
    if eps <= 0:
        raise ValueError(f"bandwidth eps={eps} must be positive")
    return JumpReLUSlots.apply(pre_BK, theta_L, idx_BK, valid_BK, eps,
                               pre_BK.shape[0] if num_tokens is None else num_tokens)


class _DenseReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta), (z > theta).to(z.dtype).sum(-1).mean()

    @staticmethod
    def backward(ctx, g_f, g_l0):
        z, theta = ctx.saved_tensors
        r = rect((z - theta) / ctx.eps)
        g_theta = (-(theta / ctx.eps) * r * g_f).sum(0) + (-(1.0 / ctx.eps) * r * (g_l0 / z.shape[0])).sum(0)
        return g_f * (z > theta), g_theta, None


def reference_jumprelu(pre_BL: torch.Tensor, theta_L: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense reference with the same estimators through autograd: ``(f_BL, l0)`` of
    ``relu(pre_BL)``. For tests only."""
    return _DenseReference.apply(pre_BL.relu(), theta_L, eps)
