"""Triton kernels of the fused TopK training step (same API as :mod:`.eager_fused`).

Three fusions, each cutting a pass over a large tensor (B tokens, K slots, L latents, D = d_in,
E = d_out; ``s`` bytes per weight element):

- :func:`decode_error` (forward): per token, one pass over the K decoder rows it selected gives
  the reconstruction ``x_hat = sum_j v_j W[idx_j] + b``, the error ``e = x_hat - y``, the squared
  error and the dots ``<e, W[idx_j]>`` that are the decoder-side gradient of the values. The
  unfused path reads the same ``B K E s`` bytes of W twice (decode forward, then its backward).
- :func:`scatter_pair` (backward): both weight gradients from one CSR of S^T (one index sort):
  ``G_enc[l] = sum_p a_p x_in[b_p]`` and ``G_dec[l] = sum_p c_p g[b_p]`` over the slots p that
  chose latent l, plus ``g_b_enc[l] = sum_p a_p``. One program per (latent, block of D) writes its
  rows once in sorted order: deterministic, no zero-fill, no atomics. Bytes: ``4 L (D + E)``
  written, ``B K (D + E) 4`` gathered from the (L2-resident) token rows.
- :func:`adam_flat_` / :func:`adam_rows_` (optimiser): Adam with the gradient-clipping factor
  read from device memory (no host sync), and for the decoder the projection of the gradient
  off each unit-norm row before the update and the row renormalisation after it, in one
  read-modify-write of (param, grad, exp_avg, exp_avg_sq): 16 bytes read and 12 written per
  fp32 parameter, against ~3x that for the sequence projection -> clip -> Adam -> renorm.
  :func:`row_grad_stats` supplies the per-row dots and projected squared norms in one read.

Accumulation is fp32 (fp64 for fp64 inputs). Shapes and dtypes are checked by the launchers;
index values are not (that would need a host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_ops import INTERPRETED, _acc_dtype, _block, _check, _tl_dtype, embed, gather_dot

#: Largest K for which :func:`decode_error` keeps all K rows of a token in one tile.
MAX_FUSED_K = 256


# --- kernels --------------------------------------------------------------------------------
@triton.jit
def _decode_error_kernel(
    idx_ptr, vals_ptr, w_ptr, bias_ptr, off_ptr, y_ptr, xhat_ptr, dots_ptr, errsq_ptr,
    K, E,
    s_ib, s_ik, s_vb, s_vk, s_wl, s_wd, s_ob, s_od, s_yb, s_yd, s_xb, s_xd, s_db, s_dk,
    HAS_BIAS: tl.constexpr, HAS_OFF: tl.constexpr, HAS_Y: tl.constexpr,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The K rows of token b are read once, a [BLOCK_K, BLOCK_D] tile per step along E. The dots
    # <e, W[idx_j]> accumulate elementwise in a tile and are reduced across E once at the end, so
    # the loop does one reduction (over K, for x_hat) per step, not two.
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    rows = tl.load(idx_ptr + b * s_ib + offs_k * s_ik, mask=mask_k, other=0).to(tl.int64)
    v = tl.load(vals_ptr + b * s_vb + offs_k * s_vk, mask=mask_k, other=0.0).to(ACC)
    acc = tl.full([BLOCK_K, BLOCK_D], 0.0, dtype=ACC)
    errsq = tl.full([BLOCK_D], 0.0, dtype=ACC)
    for d0 in range(0, E, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < E
        w = tl.load(w_ptr + rows[:, None] * s_wl + offs_d[None, :] * s_wd,
                    mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(ACC)
        xh = tl.sum(v[:, None] * w, axis=0)
        if HAS_BIAS:
            xh += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        if HAS_OFF:
            xh += tl.load(off_ptr + b * s_ob + offs_d * s_od, mask=mask_d, other=0.0).to(ACC)
        tl.store(xhat_ptr + b * s_xb + offs_d * s_xd, xh, mask=mask_d)
        if HAS_Y:
            e = xh - tl.load(y_ptr + b * s_yb + offs_d * s_yd, mask=mask_d, other=0.0).to(ACC)
            e = tl.where(mask_d, e, 0.0)
            acc += w * e[None, :]
            errsq += e * e
    if HAS_Y:
        tl.store(dots_ptr + b * s_db + offs_k * s_dk, tl.sum(acc, axis=1), mask=mask_k)
        tl.store(errsq_ptr + b, tl.sum(errsq, axis=0))


def _decode_configs(block_k: int) -> list:
    """Tiles of at most 64 elements per thread, from one warp (K within a thread's registers, no
    cross-warp reduction) up to eight."""
    out = []
    for warps in (1, 2, 4, 8):
        block_d = 64 * 32 * warps // block_k
        if 16 <= block_d <= 256:
            out.append(triton.Config({"BLOCK_D": block_d}, num_warps=warps))
    return out or [triton.Config({"BLOCK_D": 16}, num_warps=8)]


_decode_tuned: dict[int, object] = {}


def _decode_kernel_for(block_k: int):
    """The autotuned decode kernel for tiles of ``block_k`` rows (CUDA), or None (interpreter)."""
    if INTERPRETED:
        return None
    if block_k not in _decode_tuned:
        # Keyed by E only: AuxK's K (the dead count, up to k_aux) changes from step to step, and
        # re-timing the tiles for each would cost a benchmark per new count; the tile is per block_k.
        _decode_tuned[block_k] = triton.autotune(configs=_decode_configs(block_k), key=["E"])(
            _decode_error_kernel)
    return _decode_tuned[block_k]


@triton.jit
def _scatter_pair_kernel(
    row_ptr_ptr, perm_ptr,
    a_ptr, xa_ptr, ga_ptr, gbias_ptr, c_ptr, yc_ptr, gc_ptr,
    K, DA, DC,
    s_ab, s_ak, s_xab, s_xad, s_gal, s_gad, s_cb, s_ck, s_ycb, s_ycd, s_gcl, s_gcd,
    HAS_A: tl.constexpr, HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (l, d-block): the slots p in [row_ptr[l], row_ptr[l+1]) of the sorted order chose
    # latent l; slot p is token b = perm[p] // K, position j = perm[p] % K.
    row = tl.program_id(0).to(tl.int64)
    dblk = tl.program_id(1)
    offs_d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_da = offs_d < DA
    mask_dc = offs_d < DC
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)
    acc_a = tl.full([BLOCK_D], 0.0, dtype=ACC)
    acc_c = tl.full([BLOCK_D], 0.0, dtype=ACC)
    bsum = tl.full([BLOCK_N], 0.0, dtype=ACC)
    for p0 in range(start, end, BLOCK_N):
        offs_p = p0 + tl.arange(0, BLOCK_N)
        mask_p = offs_p < end
        flat = tl.load(perm_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
        b = flat // K
        j = flat % K
        if HAS_A:
            a = tl.load(a_ptr + b * s_ab + j * s_ak, mask=mask_p, other=0.0).to(ACC)
            xa = tl.load(xa_ptr + b[:, None] * s_xab + offs_d[None, :] * s_xad,
                         mask=mask_p[:, None] & mask_da[None, :], other=0.0).to(ACC)
            acc_a += tl.sum(a[:, None] * xa, axis=0)
            bsum += a
        if HAS_C:
            c = tl.load(c_ptr + b * s_cb + j * s_ck, mask=mask_p, other=0.0).to(ACC)
            yc = tl.load(yc_ptr + b[:, None] * s_ycb + offs_d[None, :] * s_ycd,
                         mask=mask_p[:, None] & mask_dc[None, :], other=0.0).to(ACC)
            acc_c += tl.sum(c[:, None] * yc, axis=0)
    if HAS_A:
        tl.store(ga_ptr + row * s_gal + offs_d * s_gad, acc_a, mask=mask_da)
        if HAS_BIAS:
            if dblk == 0:
                tl.store(gbias_ptr + row, tl.sum(bsum, axis=0))
    if HAS_C:
        tl.store(gc_ptr + row * s_gcl + offs_d * s_gcd, acc_c, mask=mask_dc)


# Wider D blocks mean fewer, longer programs (L x D/BLOCK_D of them); which wins depends on L, D
# and the card, so CUDA runs pick per (DA, DC) by timing (outputs are overwritten whole, so re-runs
# are harmless). The interpreter takes the first.
_SCATTER_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_D": d}, num_warps=w)
                    for n, d, w in ((16, 128, 4), (8, 256, 4), (4, 512, 4), (8, 512, 8))]
_scatter_pair_tuned = None if INTERPRETED else triton.autotune(configs=_SCATTER_CONFIGS, key=["DA", "DC"])(
    _scatter_pair_kernel)


@triton.jit
def _row_stats_kernel(g_ptr, w_ptr, dot_ptr, sq_ptr, D, s_gl, s_gd, s_wl, s_wd,
                      PROJECT: tl.constexpr, BLOCK_D: tl.constexpr):
    # dot = <g, w>; sq = ||g - dot w||^2 = gg - 2 dot^2 + dot^2 ww (PROJECT) or gg.
    row = tl.program_id(0).to(tl.int64)
    gg = tl.full([BLOCK_D], 0.0, dtype=tl.float32)
    gw = tl.full([BLOCK_D], 0.0, dtype=tl.float32)
    ww = tl.full([BLOCK_D], 0.0, dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(g_ptr + row * s_gl + offs_d * s_gd, mask=mask_d, other=0.0).to(tl.float32)
        gg += g * g
        if PROJECT:
            w = tl.load(w_ptr + row * s_wl + offs_d * s_wd, mask=mask_d, other=0.0).to(tl.float32)
            gw += g * w
            ww += w * w
    sgg = tl.sum(gg, axis=0)
    if PROJECT:
        dot = tl.sum(gw, axis=0)
        sww = tl.sum(ww, axis=0)
        tl.store(dot_ptr + row, dot)
        tl.store(sq_ptr + row, tl.maximum(sgg - 2.0 * dot * dot + dot * dot * sww, 0.0))
    else:
        tl.store(sq_ptr + row, sgg)


@triton.jit
def _adam_update(p, g, m, v, coef, beta1, beta2, step_size, bc2_sqrt, eps):
    g = g * coef
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bc2_sqrt + eps
    return p - step_size * (m / denom), m, v


@triton.jit
def _adam_flat_kernel(p_ptr, g_ptr, m_ptr, v_ptr, shadow_ptr, coef_ptr, hyper_ptr, N,
                      beta1, beta2, step_size, bc2_sqrt, eps,
                      HAS_SHADOW: tl.constexpr, HYPER_ON_DEVICE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    coef = tl.load(coef_ptr).to(tl.float32)
    if HYPER_ON_DEVICE:  # (step_size, bc2_sqrt) read from memory: a CUDA graph replays this launch
        step_size = tl.load(hyper_ptr).to(tl.float32)
        bc2_sqrt = tl.load(hyper_ptr + 1).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p, m, v = _adam_update(p, g, m, v, coef, beta1, beta2, step_size, bc2_sqrt, eps)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    if HAS_SHADOW:
        tl.store(shadow_ptr + offs, p.to(shadow_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adam_rows_kernel(p_ptr, g_ptr, m_ptr, v_ptr, shadow_ptr, dot_ptr, coef_ptr, hyper_ptr, D,
                      beta1, beta2, step_size, bc2_sqrt, eps, norm_eps,
                      PROJECT: tl.constexpr, RENORM: tl.constexpr, HAS_SHADOW: tl.constexpr,
                      HYPER_ON_DEVICE: tl.constexpr, SINGLE: tl.constexpr, BLOCK_D: tl.constexpr):
    # One contiguous row of D elements per program: g <- (g - <g, p> p) * coef, Adam, then
    # p <- p / max(||p||, norm_eps). SINGLE: the row fits one block and stays in registers.
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    coef = tl.load(coef_ptr).to(tl.float32)
    if HYPER_ON_DEVICE:
        step_size = tl.load(hyper_ptr).to(tl.float32)
        bc2_sqrt = tl.load(hyper_ptr + 1).to(tl.float32)
    dot = 0.0
    if PROJECT:
        dot = tl.load(dot_ptr + row).to(tl.float32)
    if SINGLE:
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        p = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if PROJECT:
            g = g - dot * p
        p, m, v = _adam_update(p, g, m, v, coef, beta1, beta2, step_size, bc2_sqrt, eps)
        if RENORM:
            p = p / tl.maximum(tl.sqrt(tl.sum(tl.where(mask, p * p, 0.0), axis=0)), norm_eps)
        tl.store(p_ptr + base + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + base + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + base + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
        if HAS_SHADOW:
            tl.store(shadow_ptr + base + offs, p.to(shadow_ptr.dtype.element_ty), mask=mask)
    else:
        sq = tl.full([BLOCK_D], 0.0, dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            mask = offs < D
            p = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            if PROJECT:
                g = g - dot * p
            p, m, v = _adam_update(p, g, m, v, coef, beta1, beta2, step_size, bc2_sqrt, eps)
            sq += tl.where(mask, p * p, 0.0)
            tl.store(p_ptr + base + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
            tl.store(m_ptr + base + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
            tl.store(v_ptr + base + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
            if HAS_SHADOW:
                if not RENORM:
                    tl.store(shadow_ptr + base + offs, p.to(shadow_ptr.dtype.element_ty), mask=mask)
        if RENORM:
            scale = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), norm_eps)
            for d0 in range(0, D, BLOCK_D):
                offs = d0 + tl.arange(0, BLOCK_D)
                mask = offs < D
                p = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) * scale
                tl.store(p_ptr + base + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
                if HAS_SHADOW:
                    tl.store(shadow_ptr + base + offs, p.to(shadow_ptr.dtype.element_ty), mask=mask)


# --- launchers ------------------------------------------------------------------------------
def decode_error(idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_LE: torch.Tensor, bias_E: torch.Tensor | None,
                 offset_BE: torch.Tensor | None, y_BE: torch.Tensor | None):
    """``x_hat = S W + bias + offset`` and, with a target ``y``, ``dots[b, j] = <x_hat[b] - y[b],
    W[idx[b, j]]>`` and ``err_sq[b] = ||x_hat[b] - y[b]||^2``.

    Returns:
        (x_hat [B, E], dots [B, K] or None, err_sq [B] or None), in the accumulation dtype.

    Raises:
        ValueError: shapes, dtypes or devices do not fit together.
    """
    named = {"W": W_LE, "vals": vals_BK}
    if y_BE is not None:
        named["y"] = y_BE
    _check(idx_BK, **named)
    (B, K), E = idx_BK.shape, W_LE.shape[1]
    if K > MAX_FUSED_K:  # too many rows for one tile (AuxK's k_aux): decode, then dot, two reads of W
        x_hat = embed(idx_BK, vals_BK, W_LE)
        if bias_E is not None:
            x_hat += bias_E
        if offset_BE is not None:
            x_hat += offset_BE
        if y_BE is None:
            return x_hat, None, None
        e = x_hat - y_BE
        return x_hat, gather_dot(e, W_LE, idx_BK), e.pow(2).sum(1)
    acc = _acc_dtype(vals_BK, W_LE)
    dev = W_LE.device
    x_hat = torch.empty(B, E, dtype=acc, device=dev)
    dots = torch.empty(B, K, dtype=acc, device=dev) if y_BE is not None else None
    err_sq = torch.empty(B, dtype=acc, device=dev) if y_BE is not None else None
    if B == 0:
        return x_hat, dots, err_sq
    BLOCK_K = _block(K, MAX_FUSED_K)
    dummy = x_hat
    off = offset_BE if offset_BE is not None else dummy
    y = y_BE if y_BE is not None else dummy
    d = dots if dots is not None else x_hat
    args = (idx_BK, vals_BK, W_LE, bias_E if bias_E is not None else dummy, off, y, x_hat, d,
            err_sq if err_sq is not None else x_hat,
            K, E, *idx_BK.stride(), *vals_BK.stride(), *W_LE.stride(), *off.stride(), *y.stride(), *x_hat.stride(),
            *d.stride())
    flags = dict(HAS_BIAS=bias_E is not None, HAS_OFF=offset_BE is not None, HAS_Y=y_BE is not None,
                 ACC=_tl_dtype(acc), BLOCK_K=BLOCK_K)
    tuned = _decode_kernel_for(BLOCK_K) if acc == torch.float32 else None
    if tuned is not None:
        tuned[(B,)](*args, **flags)
    else:
        _decode_error_kernel[(B,)](*args, **flags, BLOCK_D=max(16, min(128, 4096 // BLOCK_K)), num_warps=4)
    return x_hat, dots, err_sq


def csr_of(idx_BK: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_ptr [num_rows + 1], perm [B*K]): slots sorted by latent (stable), without a host sync."""
    sorted_idx, perm = torch.sort(idx_BK.reshape(-1), stable=True)
    row_ptr = torch.searchsorted(sorted_idx, torch.arange(num_rows + 1, dtype=sorted_idx.dtype,
                                                          device=sorted_idx.device))
    return row_ptr, perm


def scatter_pair(idx_BK: torch.Tensor, num_rows: int, a_BK: torch.Tensor | None, xa_BD: torch.Tensor | None,
                 c_BK: torch.Tensor | None, yc_BE: torch.Tensor | None, *, bias_grad: bool = False):
    """``G_a = S_a^T xa`` [L, D], ``G_c = S_c^T yc`` [L, E] and ``g_bias[l] = sum of a at l`` [L],
    where S_a, S_c hold ``a``, ``c`` at ``idx``; either side may be None.

    Returns:
        (G_a or None, g_bias or None, G_c or None), in the accumulation dtype.
    """
    named = {}
    if a_BK is not None:
        named.update(vals=a_BK, y=xa_BD)
    if c_BK is not None:
        _check(idx_BK, vals=c_BK, y=yc_BE)
    _check(idx_BK, **named)
    B, K = idx_BK.shape
    DA = xa_BD.shape[1] if a_BK is not None else 0
    DC = yc_BE.shape[1] if c_BK is not None else 0
    tensors = [t for t in (a_BK, xa_BD, c_BK, yc_BE) if t is not None]
    acc = _acc_dtype(*tensors)
    dev = idx_BK.device
    G_a = torch.empty(num_rows, DA, dtype=acc, device=dev) if a_BK is not None else None
    G_c = torch.empty(num_rows, DC, dtype=acc, device=dev) if c_BK is not None else None
    g_bias = torch.empty(num_rows, dtype=acc, device=dev) if (a_BK is not None and bias_grad) else None
    if num_rows == 0 or not tensors:
        return G_a, g_bias, G_c
    if B * K == 0:
        return tuple(t.zero_() if t is not None else None for t in (G_a, g_bias, G_c))
    row_ptr, perm = csr_of(idx_BK, num_rows)
    D = max(DA, DC, 1)
    dummy = G_a if G_a is not None else G_c
    a = a_BK if a_BK is not None else dummy
    xa = xa_BD if xa_BD is not None else dummy
    c = c_BK if c_BK is not None else dummy
    yc = yc_BE if yc_BE is not None else dummy
    ga = G_a if G_a is not None else dummy
    gc = G_c if G_c is not None else dummy
    args = (row_ptr, perm, a, xa, ga, g_bias if g_bias is not None else dummy, c, yc, gc,
            K, DA, DC, *a.stride(), *xa.stride(), *ga.stride(), *c.stride(), *yc.stride(), *gc.stride())
    flags = dict(HAS_A=a_BK is not None, HAS_C=c_BK is not None, HAS_BIAS=g_bias is not None, ACC=_tl_dtype(acc))
    if _scatter_pair_tuned is not None and acc == torch.float32:
        _scatter_pair_tuned[lambda meta: (num_rows, triton.cdiv(D, meta["BLOCK_D"]))](*args, **flags)
    else:
        BLOCK_D = _block(D, 128)
        _scatter_pair_kernel[(num_rows, triton.cdiv(D, BLOCK_D))](*args, **flags, BLOCK_N=16, BLOCK_D=BLOCK_D)
    return G_a, g_bias, G_c


def row_grad_stats(g_LD: torch.Tensor, W_LD: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per row: ``dot = <g, W>`` and the squared norm of ``g - dot W`` (of ``g`` when W is None).

    Returns:
        (dot [L] fp32 or None, sq [L] fp32).
    """
    if g_LD.dim() != 2 or (W_LD is not None and W_LD.shape != g_LD.shape):
        raise ValueError(f"grad {tuple(g_LD.shape)} and weight {None if W_LD is None else tuple(W_LD.shape)} "
                         "must be equal [L, D] shapes")
    L, D = g_LD.shape
    dot = torch.empty(L, dtype=torch.float32, device=g_LD.device) if W_LD is not None else None
    sq = torch.empty(L, dtype=torch.float32, device=g_LD.device)
    if L == 0:
        return dot, sq
    w = W_LD if W_LD is not None else g_LD
    _row_stats_kernel[(L,)](g_LD, w, dot if dot is not None else sq, sq, D, *g_LD.stride(), *w.stride(),
                            PROJECT=W_LD is not None, BLOCK_D=_block(D, 1024))
    return dot, sq


def _check_adam(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, shadow: torch.Tensor | None):
    for name, t in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)) + ((("shadow", shadow),) if shadow is not None
                                                                       else ()):
        if t.shape != p.shape or t.device != p.device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous tensor shaped like the parameter {tuple(p.shape)} on "
                             f"{p.device}; got {tuple(t.shape)} on {t.device}")
    if not p.is_contiguous():
        raise ValueError("fused Adam needs contiguous parameters")


def _hyper(step_size, bc2_sqrt, like: torch.Tensor):
    """Kernel arguments for (step_size, bc2_sqrt): floats, or a 2-element device tensor read by the
    kernel (``step_size`` is then that tensor and ``bc2_sqrt`` is ignored)."""
    if isinstance(step_size, torch.Tensor):
        if step_size.numel() != 2 or step_size.device != like.device or step_size.dtype != torch.float32:
            raise ValueError("device hyperparameters must be a float32 tensor [step_size, bc2_sqrt] on the "
                             "parameter's device")
        return step_size, 0.0, 0.0, True
    return like, float(step_size), float(bc2_sqrt), False


def adam_flat_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, coef: torch.Tensor, *,
               beta1: float, beta2: float, step_size, bc2_sqrt, eps: float,
               shadow: torch.Tensor | None = None) -> None:
    """In place: ``g *= coef[0]``; Adam on every element (``step_size = lr / (1 - beta1^t)``).

    ``step_size`` may be a device tensor ``[step_size, bc2_sqrt]`` (then ``bc2_sqrt`` is ignored).
    """
    _check_adam(p, g, m, v, shadow)
    N = p.numel()
    if N == 0:
        return
    BLOCK = 1024
    hyper, ss, bc, on_dev = _hyper(step_size, bc2_sqrt, p)
    _adam_flat_kernel[(triton.cdiv(N, BLOCK),)](
        p, g, m, v, shadow if shadow is not None else p, coef, hyper, N, beta1, beta2, ss, bc, eps,
        HAS_SHADOW=shadow is not None, HYPER_ON_DEVICE=on_dev, BLOCK=BLOCK, num_warps=4,
    )


def adam_rows_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, coef: torch.Tensor,
               dot: torch.Tensor | None, *, renorm: bool, beta1: float, beta2: float, step_size,
               bc2_sqrt, eps: float, norm_eps: float, shadow: torch.Tensor | None = None) -> None:
    """In place on a [L, D] parameter: ``g = (g - dot[l] p[l]) * coef`` (projection when ``dot``
    is given), Adam, then ``p[l] /= max(||p[l]||, norm_eps)`` when ``renorm``."""
    _check_adam(p, g, m, v, shadow)
    if p.dim() != 2:
        raise ValueError(f"adam_rows_ needs a 2-d parameter, got shape {tuple(p.shape)}")
    L, D = p.shape
    if L == 0 or D == 0:
        return
    BLOCK_D = _block(D, 4096)
    hyper, ss, bc, on_dev = _hyper(step_size, bc2_sqrt, p)
    _adam_rows_kernel[(L,)](
        p, g, m, v, shadow if shadow is not None else p, dot if dot is not None else coef, coef, hyper, D,
        beta1, beta2, ss, bc, eps, norm_eps,
        PROJECT=dot is not None, RENORM=renorm, HAS_SHADOW=shadow is not None, HYPER_ON_DEVICE=on_dev,
        SINGLE=D <= BLOCK_D, BLOCK_D=BLOCK_D, num_warps=4 if BLOCK_D <= 1024 else 8,
    )
