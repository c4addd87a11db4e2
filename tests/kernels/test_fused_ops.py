"""The fused TopK step's kernels (kernels/triton_fused.py, kernels/autoencode.py) against references.

``sparse_autoencode`` through the Triton kernels (interpreted on CPU, see conftest.py) is compared,
values and all gradients, with ``reference_autoencode`` (dense, autograd, fp64) on the odd shapes of
test_sparse_ops.py, with and without the pre-encoder bias, a skip offset and a target, for an SAE
and a transcoder (d_in != d_out); the launchers are compared with their eager references
(kernels/eager_fused.py), the Adam kernels on both of their code paths (a row in one block, and
rows longer than a block); and every new kernel (each autotuning candidate too) compiles for a
real GPU (sm90) without one. The same kernels also compile for sm80 and sm90 with Triton 3.6 (the
GPU image's version; checked by hand in a separate venv).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from sae_kernels import eager_fused
from sae_kernels.autoencode import SparseAutoencode, reference_autoencode, sparse_autoencode
from test_sparse_ops import CASES, TOL, Case, assert_close, leaf, make_inputs


def _weights(c: Case, dtype: torch.dtype, E: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(c.L, c.D, generator=g) / c.D**0.5
    b_enc = torch.randn(c.L, generator=g) * 0.1
    W_dec = torch.randn(c.L, E, generator=g) / E**0.5
    b_dec = torch.randn(E, generator=g) * 0.1
    y = torch.randn(c.B, E, generator=g)
    off = torch.randn(c.B, E, generator=g)
    return [t.to(dtype) for t in (W_enc, b_enc, W_dec, b_dec, y, off)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["sae", "transcoder_skip", "no_target"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_autoencode_matches_dense_reference(triton_ops, case, variant, dtype):
    idx, _, _, _, x = make_inputs(case, dtype)
    E = case.D if variant != "transcoder_skip" else case.D + 3
    W_enc, b_enc, W_dec, b_dec, y, off = _weights(case, dtype, E)
    if dtype == torch.bfloat16:  # keep pre-activations away from 0, where bf16 rounding would flip the ReLU
        b_enc = b_enc + 3
    b_pre = b_dec if variant != "transcoder_skip" else None
    offset = off if variant == "transcoder_skip" else None
    target = y if variant != "no_target" else None

    def run(fn, to):
        We, be, Wd, bd = (leaf(t, to) for t in (W_enc, b_enc, W_dec, b_dec))
        bp = bd if b_pre is not None else None
        o = leaf(offset, to) if offset is not None else None
        xx = x.to(to)
        if fn is sparse_autoencode:
            with torch.no_grad():
                pre = ((xx.float() - (bp.float() if bp is not None else 0)) @ We.float().T + be.float())
                pre = pre.gather(1, idx.long()).to(to)
            vals, x_hat, err = fn(xx, idx, pre, We, be, Wd, bd, b_pre_D=bp, offset_BE=o,
                                  y_BE=target.to(to) if target is not None else None)
        else:
            vals, x_hat, err = fn(xx, idx, We, be, Wd, bd, b_pre_D=bp, offset_BE=o,
                                  y_BE=target.to(to) if target is not None else None)
        # Every output carries gradient: the squared error, the reconstruction and the codes.
        (err + 0.25 * x_hat.pow(2).sum() + 0.5 * vals.sum()).backward()
        grads = {"W_enc": We.grad, "b_enc": be.grad, "W_dec": Wd.grad, "b_dec": bd.grad}
        if o is not None:
            grads["offset"] = o.grad
        return vals, x_hat, err, grads

    vals, x_hat, err, grads = run(sparse_autoencode, dtype)
    rvals, rx, rerr, rgrads = run(reference_autoencode, torch.float64)
    tol = TOL[dtype]
    assert x_hat.dtype == torch.float32 and x_hat.shape == (case.B, E)
    assert_close(vals, rvals, tol, "vals")
    assert_close(x_hat, rx, tol, "x_hat")
    assert_close(err.reshape(1), rerr.reshape(1), tol, "err_sq")
    for name, g in grads.items():
        assert g is not None and g.dtype == dtype, name
        assert_close(g, rgrads[name], tol, f"grad {name}")


def test_autoencode_gradcheck(triton_ops):
    idx, _, _, _, x = make_inputs(Case(B=3, K=3, L=5, D=4, duplicates=True), torch.float64)
    W_enc, b_enc, W_dec, b_dec, y, _ = _weights(Case(B=3, K=3, L=5, D=4), torch.float64, 4)

    def f(We, be, Wd, bd):
        pre = ((x - bd) @ We.T + be).gather(1, idx.long()).detach()
        vals, x_hat, err = sparse_autoencode(x, idx, pre, We, be, Wd, bd, b_pre_D=bd, y_BE=y)
        return err, x_hat, vals

    assert torch.autograd.gradcheck(f, tuple(leaf(t) for t in (W_enc, b_enc, W_dec, b_dec)))


def test_autoencode_runs_the_fused_function_on_triton_and_the_op_chain_on_eager(monkeypatch, triton_ops):
    idx, _, _, _, x = make_inputs(CASES["odd_d"], torch.float32)
    W_enc, b_enc, W_dec, b_dec, y, _ = _weights(CASES["odd_d"], torch.float32, CASES["odd_d"].D)
    pre = torch.rand(idx.shape)
    _, x_hat, _ = sparse_autoencode(x, idx, pre, leaf(W_enc), b_enc, W_dec, b_dec, y_BE=y)
    assert x_hat.grad_fn.name().startswith(SparseAutoencode.__name__)
    monkeypatch.setenv("SAE_KERNEL_BACKEND", "eager")
    _, x_hat, _ = sparse_autoencode(x, idx, pre, leaf(W_enc), b_enc, W_dec, b_dec, y_BE=y)
    assert not x_hat.grad_fn.name().startswith(SparseAutoencode.__name__)


def test_autoencode_rejects_bad_shapes():
    idx = torch.zeros(2, 3, dtype=torch.long)
    x, pre = torch.randn(2, 4), torch.randn(2, 3)
    W, b = torch.randn(5, 4), torch.randn(5)
    with pytest.raises(ValueError, match="y has shape"):
        sparse_autoencode(x, idx, pre, W, b, W, y_BE=torch.randn(2, 5))
    with pytest.raises(ValueError, match="do not fit x with d=6"):
        sparse_autoencode(torch.randn(2, 6), idx, pre, W, b, W)


# --- launchers against their eager references ---------------------------------------------------
@pytest.mark.parametrize("K", [3, 260], ids=["one_tile", "k_above_tile"])
def test_decode_error_matches_eager(triton_ops, K):
    from sae_kernels import triton_fused

    g = torch.Generator().manual_seed(0)
    B, L, E = 5, 300, 21
    idx = torch.randint(0, L, (B, K), generator=g)
    vals, W = torch.randn(B, K, generator=g), torch.randn(L, E, generator=g)
    b, off, y = torch.randn(E, generator=g), torch.randn(B, E, generator=g), torch.randn(B, E, generator=g)
    for args in ((b, off, y), (None, None, y), (b, None, None)):
        out = triton_fused.decode_error(idx, vals, W, *args)
        ref = eager_fused.decode_error(idx, vals, W, *args)
        for o, r, name in zip(out, ref, ("x_hat", "dots", "err_sq")):
            assert (o is None) == (r is None), name
            if o is not None:
                assert_close(o, r, 2e-6, name)


@pytest.mark.parametrize("name", ["hot_latent", "duplicates_int32", "noncontiguous", "multi_block"])
def test_scatter_pair_matches_eager(triton_ops, name):
    from sae_kernels import triton_fused

    case = CASES[name]
    idx, vals, _, _, x = make_inputs(case, torch.float32)
    g = torch.Generator().manual_seed(3)
    c, y = torch.randn(case.B, case.K, generator=g), torch.randn(case.B, case.D + 2, generator=g)
    for sides in ((vals, x, c, y), (vals, x, None, None), (None, None, c, y)):
        out = triton_fused.scatter_pair(idx, case.L, *sides, bias_grad=True)
        ref = eager_fused.scatter_pair(idx, case.L, *sides, bias_grad=True)
        for o, r, what in zip(out, ref, ("G_a", "g_bias", "G_c")):
            assert (o is None) == (r is None), what
            if o is not None:
                assert_close(o, r, 2e-6, what)


def test_row_grad_stats_match_eager(triton_ops):
    from sae_kernels import triton_fused

    g = torch.Generator().manual_seed(0)
    G, W = torch.randn(7, 1500, generator=g), torch.randn(7, 1500, generator=g)  # rows longer than one block
    W /= W.norm(dim=1, keepdim=True)
    for w in (W, None):
        dot, sq = triton_fused.row_grad_stats(G, w)
        rdot, rsq = eager_fused.row_grad_stats(G, w)
        if w is not None:
            assert_close(dot, rdot, 2e-6, "dot")
            projected = G - rdot[:, None] * W
            assert_close(sq, projected.pow(2).sum(1), 2e-5, "projected squared norm")
        assert_close(sq, rsq, 2e-5, "sq")


@pytest.mark.parametrize("D", [37, 5000], ids=["row_in_one_block", "row_longer_than_a_block"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32_states", "bf16_states"])
def test_adam_kernels_match_eager(triton_ops, D, state_dtype):
    from sae_kernels import triton_fused

    g = torch.Generator().manual_seed(0)
    L = 6
    p0 = torch.randn(L, D, generator=g)
    p0 /= p0.norm(dim=1, keepdim=True)
    grad = torch.randn(L, D, generator=g)
    m0 = torch.randn(L, D, generator=g).to(state_dtype)
    v0 = torch.rand(L, D, generator=g).to(state_dtype)
    coef = torch.tensor([0.7])
    dot = (grad * p0).sum(1)
    kw = dict(beta1=0.9, beta2=0.999, step_size=1e-2 / (1 - 0.9**3), bc2_sqrt=(1 - 0.999**3) ** 0.5, eps=1e-8)
    results = []
    for ops in (triton_fused, eager_fused):
        p, m, v = p0.clone(), m0.clone(), v0.clone()
        shadow = torch.empty(L, D, dtype=torch.bfloat16)
        ops.adam_rows_(p, grad, m, v, coef, dot, renorm=True, norm_eps=1e-7, shadow=shadow, **kw)
        q, mq, vq = p0.clone().reshape(-1), m0.clone().reshape(-1), v0.clone().reshape(-1)
        ops.adam_flat_(q, grad.reshape(-1), mq, vq, coef, **kw)
        results.append((p, m, v, shadow, q, mq, vq))
    tol = 2e-6 if state_dtype == torch.float32 else 1e-2
    for got, ref, name in zip(*results, ("p rows", "m rows", "v rows", "shadow", "p flat", "m flat", "v flat")):
        assert got.dtype == ref.dtype, name
        bound = 2e-6 if name in ("p rows", "p flat") else 2 ** -8 if name == "shadow" else tol
        assert_close(got.float(), ref.float(), bound, name)
    p = results[0][0]
    assert_close(p.norm(dim=1), torch.ones(L), 1e-6, "renormalised rows")
    # The shadow is the bf16 cast of the new rows (within one bf16 step: the interpreter truncates
    # where the GPU rounds to nearest).
    assert ((results[0][3].float() - p).abs() <= p.abs() * 2**-7).all()


# --- the new kernels compile for a real GPU -------------------------------------------------------
COMPILE_FOR_CUDA = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import sae_kernels.topk_select as TK
import sae_kernels.triton_fused as F

assert not F.INTERPRETED
FLOATS = {"beta1", "beta2", "step_size", "bc2_sqrt", "eps", "norm_eps"}


def comp(fn, consts, ptr_types=None, warps=4):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = (ptr_types or {}).get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    cv = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=cv), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps})
    assert kernel.asm["cubin"], fn.__name__


n = 0
for bk in (32, 64):  # every autotuning candidate of the two k of the benchmark shapes
    for cfg in F._decode_configs(bk):
        comp(F._decode_error_kernel, {"HAS_BIAS": True, "HAS_OFF": True, "HAS_Y": True, "ACC": tl.float32,
                                      "BLOCK_K": bk, "BLOCK_D": cfg.kwargs["BLOCK_D"]}, {"idx_ptr": "*i64"},
             cfg.num_warps)
        n += 1
for cfg in F._SCATTER_CONFIGS:
    comp(F._scatter_pair_kernel, {"HAS_A": True, "HAS_C": True, "HAS_BIAS": True, "ACC": tl.float32, **cfg.kwargs},
         {"row_ptr_ptr": "*i64", "perm_ptr": "*i64", "xa_ptr": "*bf16"}, cfg.num_warps)
    n += 1
comp(F._row_stats_kernel, {"PROJECT": True, "BLOCK_D": 1024})
for hyper in (True, False):
    comp(F._adam_flat_kernel, {"HAS_SHADOW": True, "HYPER_ON_DEVICE": hyper, "BLOCK": 1024}, {"shadow_ptr": "*bf16"})
    for single, block in ((True, 4096), (False, 1024)):
        comp(F._adam_rows_kernel, {"PROJECT": True, "RENORM": True, "HAS_SHADOW": True, "HYPER_ON_DEVICE": hyper,
                                   "SINGLE": single, "BLOCK_D": block},
             {"shadow_ptr": "*bf16", "m_ptr": "*bf16", "v_ptr": "*bf16"}, 8)
comp(TK._topk_bf16_kernel, {"BLOCK": 4096}, {"s_ptr": "*i16", "vals_ptr": "*i16", "idx_ptr": "*i64"}, 8)
print("compiled", n + 8)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton's CUDA toolchain ships for Linux")
def test_fused_kernels_compile_for_cuda_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_CUDA], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 19" in proc.stdout
