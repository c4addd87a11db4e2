"""Triton implementations of the three sparse primitives (same API as :mod:`.eager`).

S is the sparse [B, L] code matrix with K non-zeros per row (values ``vals_BK`` at columns
``idx_BK``). The TopK family needs three products with it:

- :func:`embed`          ``out_BD[b]    = sum_j vals[b, j] * W_LD[idx[b, j]]``    (``S W``)
- :func:`gather_dot`     ``out_BK[b, j] = <y_BD[b], W_LD[idx[b, j]]>``           (``(y W^T)`` at S's pattern)
- :func:`scatter_outer`  ``out_LD[l]    = sum_{b,j: idx[b,j]=l} vals[b, j] y_BD[b]``  (``S^T y``)

and :func:`decode_backward` combines the last two for the gradient of :func:`embed`.

Memory traffic (fp32 bytes, ``s`` bytes per input element): ``embed`` and ``gather_dot`` read
B*K rows of W (the latents that fired) plus B rows of activations and write B rows / B*K scalars:
``s (B K D + B D) + 4 B D`` and ``s (B K D + B D) + 4 B K``, with 2 B K D FLOPs, against the
dense product's ``s (L D + B D + B L)`` bytes, 2 B L D FLOPs and a [B, L] code matrix.
``scatter_outer`` reads B*K rows of y and writes the dense [L, D] gradient once: ``s B K D +
4 L D`` bytes, 2 B K D FLOPs. Nothing of shape [B, L] is ever allocated.

Kernels: one program per (row b, block of D) for ``embed``; per (row b, block of K) looping over
D for ``gather_dot``. ``scatter_outer`` has two strategies:

- deterministic (default): a stable ``torch.sort`` of the flattened indices and
  ``torch.searchsorted`` give CSR row pointers (no host sync); one program per (latent l, block
  of D) sums its contributions in sorted order and writes row l once (zeros if l never fired),
  so the output needs no zero-fill pass. Bitwise reproducible run to run; a latent that fires on
  every token is summed by one program (a serial tail of B/16 steps).
- atomic: one program per (row b, block of D) ``atomic_add``-s its K contributions into a
  zero-initialised [L, D] output; summation order, hence the last bits, vary between runs.

Both move the same bytes (plus an O(B K log(B K)) index sort for the first), so the
reproducible one is the default; ``SAE_KERNEL_DETERMINISTIC=0`` selects atomics unless
``torch.use_deterministic_algorithms(True)`` is on. ``python -m sae.bench.kernels`` times both.

The autograd Functions in :mod:`.sparse_decode` / :mod:`.sparse_encode` call this module through
:mod:`.dispatch` (CUDA tensors by default). On CPU the kernels run in Triton's interpreter, for
tests: ``TRITON_INTERPRET=1`` must be set before triton itself is imported, since ``triton.jit``
reads it when a function (ours, and triton.language's own helpers) is decorated.

Inputs may be fp16/bf16/fp32 (accumulated in fp32, results fp32) or fp64 (accumulated and
returned in fp64, for gradcheck); any strides; ``idx`` int32 or int64 with values in [0, L)
(not checked: that would need a host sync). Offsets into W and the [L, D] output are int64.
Shape legend: B tokens, D d_in, L latents, K k, N = B*K.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DETERMINISTIC_ENV_VAR = "SAE_KERNEL_DETERMINISTIC"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- kernels --------------------------------------------------------------------------------
@triton.jit
def _embed_kernel(
    idx_ptr, vals_ptr, w_ptr, out_ptr,
    K, D,
    s_ib, s_ik, s_vb, s_vk, s_wl, s_wd, s_ob, s_od,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.full([BLOCK_D], 0.0, dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = tl.load(idx_ptr + b * s_ib + offs_k * s_ik, mask=mask_k, other=0).to(tl.int64)
        v = tl.load(vals_ptr + b * s_vb + offs_k * s_vk, mask=mask_k, other=0.0).to(ACC)
        w = tl.load(w_ptr + rows[:, None] * s_wl + offs_d[None, :] * s_wd,
                    mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(ACC)
        acc += tl.sum(v[:, None] * w, axis=0)
    tl.store(out_ptr + b * s_ob + offs_d * s_od, acc, mask=mask_d)


@triton.jit
def _gather_dot_kernel(
    y_ptr, w_ptr, idx_ptr, out_ptr,
    K, D,
    s_yb, s_yd, s_wl, s_wd, s_ib, s_ik, s_ob, s_ok,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    rows = tl.load(idx_ptr + b * s_ib + offs_k * s_ik, mask=mask_k, other=0).to(tl.int64)
    acc = tl.full([BLOCK_K], 0.0, dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        y = tl.load(y_ptr + b * s_yb + offs_d * s_yd, mask=mask_d, other=0.0).to(ACC)
        w = tl.load(w_ptr + rows[:, None] * s_wl + offs_d[None, :] * s_wd,
                    mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(ACC)
        acc += tl.sum(w * y[None, :], axis=1)
    tl.store(out_ptr + b * s_ob + offs_k * s_ok, acc, mask=mask_k)


@triton.jit
def _scatter_sorted_kernel(
    row_ptr_ptr, perm_ptr, vals_ptr, y_ptr, out_ptr,
    K, D,
    s_vb, s_vk, s_yb, s_yd, s_ol, s_od,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (l, d-block): out[l, d-block] = sum over the sorted positions p in
    # [row_ptr[l], row_ptr[l+1]) of vals.flat[perm[p]] * y[perm[p] // K, d-block].
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)
    acc = tl.full([BLOCK_D], 0.0, dtype=ACC)
    for p0 in range(start, end, BLOCK_N):
        offs_p = p0 + tl.arange(0, BLOCK_N)
        mask_p = offs_p < end
        flat = tl.load(perm_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
        b = flat // K
        j = flat % K
        v = tl.load(vals_ptr + b * s_vb + j * s_vk, mask=mask_p, other=0.0).to(ACC)
        y = tl.load(y_ptr + b[:, None] * s_yb + offs_d[None, :] * s_yd,
                    mask=mask_p[:, None] & mask_d[None, :], other=0.0).to(ACC)
        acc += tl.sum(v[:, None] * y, axis=0)
    tl.store(out_ptr + row * s_ol + offs_d * s_od, acc, mask=mask_d)


@triton.jit
def _scatter_atomic_kernel(
    idx_ptr, vals_ptr, y_ptr, out_ptr,
    K, D,
    s_ib, s_ik, s_vb, s_vk, s_yb, s_yd, s_ol, s_od,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    y = tl.load(y_ptr + b * s_yb + offs_d * s_yd, mask=mask_d, other=0.0).to(ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = tl.load(idx_ptr + b * s_ib + offs_k * s_ik, mask=mask_k, other=0).to(tl.int64)
        v = tl.load(vals_ptr + b * s_vb + offs_k * s_vk, mask=mask_k, other=0.0).to(ACC)
        tl.atomic_add(out_ptr + rows[:, None] * s_ol + offs_d[None, :] * s_od, v[:, None] * y[None, :],
                      mask=mask_k[:, None] & mask_d[None, :])


# --- launchers ------------------------------------------------------------------------------
# triton.jit reads TRITON_INTERPRET when a function is decorated: for the kernels above when this
# module is imported, for triton.language's own @jit helpers (tl.zeros, tl.sum) when triton is.
INTERPRETED = type(_embed_kernel).__name__ == "InterpretedFunction"
LANG_INTERPRETED = type(tl.zeros).__name__ != "JITFunction"


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(idx_BK: torch.Tensor, **named: torch.Tensor) -> None:
    """Validate ``idx`` [B, K] and the named 2-d float tensors: ``vals`` [B, K], ``y`` [B, D],
    ``W``/``like`` [L, D] (D shared with ``y``), all on idx's device."""
    if idx_BK.dim() != 2 or idx_BK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be an int32/int64 [B, K] tensor; got {idx_BK.dtype} {tuple(idx_BK.shape)}")
    if idx_BK.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before sae_kernels.triton_ops "
            "is first imported (it was imported without it); use the eager backend on CPU"
        )
    if INTERPRETED and not LANG_INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported, so triton.language's helpers are "
            "compiled functions the interpreter cannot call; set it before the process imports triton "
            "(e.g. `TRITON_INTERPRET=1 pytest ...`)"
        )
    B, K = idx_BK.shape
    for name, t in named.items():
        if t.dim() != 2 or t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be a 2-d float tensor; got {t.dtype} {tuple(t.shape)}")
        if t.device != idx_BK.device:
            raise ValueError(f"{name} is on {t.device} but idx is on {idx_BK.device}; move them to one device")
    if "vals" in named and named["vals"].shape != (B, K):
        raise ValueError(f"vals has shape {tuple(named['vals'].shape)} but idx is [{B}, {K}]")
    if "y" in named:
        y = named["y"]
        if y.shape[0] != B:
            raise ValueError(f"y has {y.shape[0]} rows but idx has B={B}")
        for name in ("W", "like"):
            if name in named and named[name].shape[1] != y.shape[1]:
                raise ValueError(f"y has d={y.shape[1]} but {name} has d={named[name].shape[1]}")


def deterministic_default() -> bool:
    """Whether :func:`scatter_outer` uses the sorted (bitwise reproducible) strategy."""
    if torch.are_deterministic_algorithms_enabled():
        return True
    raw = os.environ.get(DETERMINISTIC_ENV_VAR, "1").strip().lower()
    if raw not in ("0", "1", "true", "false"):
        raise ValueError(f"{DETERMINISTIC_ENV_VAR}={raw!r}; use 1 (sorted, default) or 0 (atomic_add)")
    return raw in ("1", "true")


def embed(idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_LD: torch.Tensor) -> torch.Tensor:
    """``out[b] = sum_j vals[b, j] * W[idx[b, j]]``; [B, D] in fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: shapes, dtypes or devices do not fit together.
        RuntimeError: CPU tensors without Triton's interpreter.
    """
    _check(idx_BK, W=W_LD, vals=vals_BK)
    (B, K), D = idx_BK.shape, W_LD.shape[1]
    acc = _acc_dtype(vals_BK, W_LD)
    out = torch.empty(B, D, dtype=acc, device=W_LD.device)
    if B == 0 or D == 0:
        return out
    if K == 0:
        return out.zero_()
    BLOCK_D, BLOCK_K = _block(D, 128), _block(K, 16)
    _embed_kernel[(B, triton.cdiv(D, BLOCK_D))](
        idx_BK, vals_BK, W_LD, out, K, D,
        *idx_BK.stride(), *vals_BK.stride(), *W_LD.stride(), *out.stride(),
        ACC=_tl_dtype(acc), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
    )
    return out


def gather_dot(y_BD: torch.Tensor, W_LD: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = <y[b], W[idx[b, j]]>``; [B, K] in fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: shapes, dtypes or devices do not fit together.
        RuntimeError: CPU tensors without Triton's interpreter.
    """
    _check(idx_BK, W=W_LD, y=y_BD)
    (B, K), D = idx_BK.shape, W_LD.shape[1]
    acc = _acc_dtype(y_BD, W_LD)
    out = torch.empty(B, K, dtype=acc, device=W_LD.device)
    if B == 0 or K == 0:
        return out
    if D == 0:
        return out.zero_()
    BLOCK_K, BLOCK_D = _block(K, 32), _block(D, 128)
    _gather_dot_kernel[(B, triton.cdiv(K, BLOCK_K))](
        y_BD, W_LD, idx_BK, out, K, D,
        *y_BD.stride(), *W_LD.stride(), *idx_BK.stride(), *out.stride(),
        ACC=_tl_dtype(acc), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
    )
    return out


def scatter_outer(idx_BK: torch.Tensor, vals_BK: torch.Tensor, y_BD: torch.Tensor, num_rows: int,
                  like_LD: torch.Tensor, *, deterministic: bool | None = None) -> torch.Tensor:
    """``out[l] = sum_{b, j : idx[b, j] = l} vals[b, j] * y[b]``, shape ``[num_rows, D]``.

    Duplicate indices add up. ``like_LD`` supplies the device and, when fp64, the dtype (values
    unused). ``deterministic=None`` follows :func:`deterministic_default`.

    Raises:
        ValueError: shapes, dtypes or devices do not fit together.
        RuntimeError: CPU tensors without Triton's interpreter.
    """
    _check(idx_BK, vals=vals_BK, y=y_BD, like=like_LD)
    if like_LD.shape[0] != num_rows:
        raise ValueError(f"like_LD has {like_LD.shape[0]} rows but num_rows={num_rows}")
    (B, K), D = idx_BK.shape, y_BD.shape[1]
    acc = _acc_dtype(vals_BK, y_BD, like_LD)
    if deterministic is None:
        deterministic = deterministic_default()
    if B * K == 0 or D == 0 or num_rows == 0:
        return torch.zeros(num_rows, D, dtype=acc, device=y_BD.device)
    BLOCK_D = _block(D, 128)
    if not deterministic:
        out = torch.zeros(num_rows, D, dtype=acc, device=y_BD.device)
        BLOCK_K = _block(K, 16)
        _scatter_atomic_kernel[(B, triton.cdiv(D, BLOCK_D))](
            idx_BK, vals_BK, y_BD, out, K, D,
            *idx_BK.stride(), *vals_BK.stride(), *y_BD.stride(), *out.stride(),
            ACC=_tl_dtype(acc), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
        )
        return out
    # CSR of S^T without a host sync: rows of the sorted order, then each latent's [start, end).
    sorted_idx_N, perm_N = torch.sort(idx_BK.reshape(-1), stable=True)
    row_ptr = torch.searchsorted(
        sorted_idx_N, torch.arange(num_rows + 1, dtype=sorted_idx_N.dtype, device=sorted_idx_N.device)
    )
    out = torch.empty(num_rows, D, dtype=acc, device=y_BD.device)
    _scatter_sorted_kernel[(num_rows, triton.cdiv(D, BLOCK_D))](
        row_ptr, perm_N, vals_BK, y_BD, out, K, D,
        *vals_BK.stride(), *y_BD.stride(), *out.stride(),
        ACC=_tl_dtype(acc), BLOCK_N=16, BLOCK_D=BLOCK_D,
    )
    return out


def decode_backward(
    grad_BD: torch.Tensor, idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_LD: torch.Tensor,
    need_vals: bool, need_W: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`embed`: ``(gather_dot(grad, W, idx), scatter_outer(idx, vals, grad))``."""
    g_vals = gather_dot(grad_BD, W_LD, idx_BK) if need_vals else None
    g_W = scatter_outer(idx_BK, vals_BK, grad_BD, W_LD.shape[0], W_LD) if need_W else None
    return g_vals, g_W
