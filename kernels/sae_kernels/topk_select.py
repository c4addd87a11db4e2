"""Row-wise top-k of bf16 scores by radix select: three streaming passes over each row.

``torch.topk`` on a [B, L] bf16 matrix (the TopK SAE's selection scores) runs a multi-block
radix select whose digit-counting kernels dominate: 1.18 ms for 4096 x 36864, 13x the time to
read the matrix once on an H200 (``python -m sae.bench.gpu --profile``). Here one program owns a
row and reads it three times:

1. histogram (256 bins) of the high byte of each score's order-preserving 16-bit key; the bin
   ``b1`` holding the k-th largest key follows from the suffix sums;
2. histogram of the low byte among keys whose high byte is ``b1``: the k-th largest key ``T``;
3. write every score with key > T and, in index order, the first ``k - #(key > T)`` with key == T.

So exactly k scores come out, the k largest (ties at the k-th value broken towards lower
indices: deterministic), in index order (the SAE does not need them sorted). Bytes: 3 reads of
the row (2 B per score) plus ``k (2 + 8)`` written; the histograms live in shared memory.

``SAE_TOPK_KERNEL=torch`` makes :func:`topk` use ``torch.topk`` everywhere (default ``radix``).

The key of a bf16 bit pattern ``u`` (as uint16): ``u | 0x8000`` for a non-negative sign, ``~u``
for a negative one, which orders keys as the values (NaN above +inf, as in ``torch.topk``).
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from .dispatch import Backend, resolve_backend

ENV_VAR = "SAE_TOPK_KERNEL"
log = logging.getLogger(__name__)
_failed: dict[str, str] = {}  # device type -> why the radix kernel could not run there (then torch.topk)


@triton.jit
def _keys(base, offs, mask):
    bits = tl.load(base + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
    return tl.where((bits & 0x8000) != 0, (~bits) & 0xFFFF, bits | 0x8000)


@triton.jit
def _kth_bin(hist, need):
    """The highest bin b with sum(hist[b:]) >= need, and sum(hist[b+1:])."""
    bins = tl.arange(0, 256)
    suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    b = tl.max(tl.where(suffix >= need, bins, 0), axis=0)
    above = tl.sum(tl.where(bins > b, hist, 0), axis=0)
    return b, above


@triton.jit
def _topk_bf16_kernel(s_ptr, vals_ptr, idx_ptr, L, K, s_sb, s_vb, s_ib, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = s_ptr + row * s_sb
    bins = tl.arange(0, 256)
    # Pass 1: high byte. Masked lanes land in bin 0 and are taken out again.
    hist = tl.zeros([256], dtype=tl.int32)
    for c0 in range(0, L, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < L
        hi = tl.where(mask, _keys(base, offs, mask) >> 8, 0)
        hist += tl.histogram(hi, 256)
    pad = tl.cdiv(L, BLOCK) * BLOCK - L
    hist = tl.where(bins == 0, hist - pad, hist)
    b1, above1 = _kth_bin(hist, K)
    # Pass 2: low byte of the keys in bin b1.
    hist = tl.zeros([256], dtype=tl.int32)
    outside = 0
    for c0 in range(0, L, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < L
        key = _keys(base, offs, mask)
        inside = mask & ((key >> 8) == b1)
        hist += tl.histogram(tl.where(inside, key & 0xFF, 0), 256)
        outside += BLOCK - tl.sum(inside.to(tl.int32), axis=0)
    hist = tl.where(bins == 0, hist - outside, hist)
    b2, above2 = _kth_bin(hist, K - above1)
    T = b1 * 256 + b2
    n_ties = K - above1 - above2  # how many scores equal to the k-th value to take (>= 1)
    # Pass 3: write the selection in index order.
    written = 0
    ties_seen = 0
    for c0 in range(0, L, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < L
        key = _keys(base, offs, mask)
        gt = (mask & (key > T)).to(tl.int32)
        eq = (mask & (key == T)).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(eq, axis=0) - eq
        take = gt + eq * (tie_rank < n_ties).to(tl.int32)
        pos = written + tl.cumsum(take, axis=0) - take
        keep = take != 0
        raw = tl.load(base + offs, mask=keep, other=0)
        tl.store(vals_ptr + row * s_vb + pos, raw, mask=keep)
        tl.store(idx_ptr + row * s_ib + pos, offs.to(tl.int64), mask=keep)
        written += tl.sum(take, axis=0)
        ties_seen += tl.sum(eq, axis=0)


def _check_args(scores_BL: torch.Tensor, k: int) -> None:
    if scores_BL.dim() != 2 or scores_BL.dtype != torch.bfloat16 or scores_BL.stride(1) != 1:
        raise ValueError(f"topk_bf16 needs a [B, L] bf16 tensor with contiguous rows; got {scores_BL.dtype} "
                         f"{tuple(scores_BL.shape)} strides {scores_BL.stride()}")
    if not 1 <= k <= scores_BL.shape[1]:
        raise ValueError(f"k={k} must be in [1, L={scores_BL.shape[1]}]")


def topk_bf16(scores_BL: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of a bf16 matrix: (values [B, k] bf16, indices [B, k]
    int64), in index order; ties at the k-th value go to the lower indices.

    Raises:
        ValueError: not a 2-d bf16 tensor with unit stride along rows, or k outside [1, L].
    """
    _check_args(scores_BL, k)
    B, L = scores_BL.shape
    vals = torch.empty(B, k, dtype=torch.bfloat16, device=scores_BL.device)
    idx = torch.empty(B, k, dtype=torch.int64, device=scores_BL.device)
    if B == 0:
        return vals, idx
    _topk_bf16_kernel[(B,)](scores_BL.view(torch.int16), vals.view(torch.int16), idx, L, k,
                            scores_BL.stride(0), vals.stride(0), idx.stride(0), BLOCK=4096, num_warps=8)
    return vals, idx


def topk(scores_BL: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k ``(values, indices)``, unsorted: :func:`topk_bf16` for bf16 scores on the
    Triton backend, ``torch.topk(sorted=False)`` otherwise (the reference).

    Raises:
        ValueError: ``SAE_TOPK_KERNEL`` is neither ``radix`` nor ``torch``.
    """
    choice = os.environ.get(ENV_VAR, "radix").strip().lower()
    if choice not in ("radix", "torch"):
        raise ValueError(f"{ENV_VAR}={choice!r}; use radix (default) or torch")
    if choice == "radix" and scores_BL.dtype == torch.bfloat16 and scores_BL.dim() == 2 and \
            scores_BL.stride(1) == 1 and resolve_backend(scores_BL.device) is Backend.TRITON and \
            scores_BL.device.type not in _failed:
        _check_args(scores_BL, k)  # a bad call is the caller's error, not a reason to fall back
        try:
            return topk_bf16(scores_BL, k)
        except Exception as e:  # noqa: BLE001 - a compiler or driver that cannot build or run it
            if scores_BL.is_cuda and torch.cuda.is_current_stream_capturing():
                raise  # a failing CUDA-graph capture, not the kernel's fault: the caller falls back
            _failed[scores_BL.device.type] = f"{type(e).__name__}: {e}"
            log.warning("the radix top-k kernel failed on %s (%s); using torch.topk", scores_BL.device, e)
    return scores_BL.topk(k, dim=1, sorted=False)
