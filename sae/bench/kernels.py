"""Benchmark of the sparse TopK kernels against the dense products they replace (not a test).

    python -m sae.bench.kernels [--quick] [--dtype bf16] [--shapes 4096,768,24576,32] [--json out.json]

For each shape (B tokens, D d_in, L latents, K k) and each backend (eager everywhere; on CUDA,
or under ``TRITON_INTERPRET=1`` for a smoke run, also Triton with both scatter strategies) it
times, median of ``--reps`` runs after warm-up (``torch.cuda.synchronize`` around each on GPU):

    op              sparse                              dense equivalent (S = dense [B, L] codes)
    embed           S W_dec            (B K D MACs)     S @ W_dec
    gather_dot      <y_b, W[idx_bj]>   (B K D)          (y @ W^T).gather(idx)
    scatter_outer   S^T y              (B K D)          S^T @ y
    decode_fwd_bwd  sparse_decode fwd + bwd (3 B K D)   S @ W, g @ W^T, S^T @ g
    encoder_grad    gather_encode bwd  (2 B K D)        g_S^T @ x, g_S @ W_enc

FLOPs are 2 per MAC. Effective GB/s counts the bytes the sparse kernel must move, with ``s`` the
input element size, ``i`` the index size and fp32 results:

    embed           B K (i + s) + B K D s + 4 B D         (idx, vals, K rows of W per token, out)
    gather_dot      B K i + B D s + B K D s + 4 B K       (idx, y, K rows of W per token, out)
    scatter_outer   B K (i + s) + B K D s + 4 L D         (idx, vals, one y row per entry, grad W)
    decode_fwd_bwd  embed + gather_dot + scatter_outer
    encoder_grad    scatter_outer + embed (g_x) + 4 B K   (b_enc grad)

The dense column times only the matmuls (the [B, L] code matrix is built beforehand), which
flatters dense; speed-up = dense time / sparse time. ``err`` is the largest relative difference
from the dense result, a sanity check. On CPU the default grid is smaller than on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from sae_kernels import eager, gather_encode, sparse_decode
from sae_kernels.dispatch import triton_available, triton_interpreting

from sae.bench.common import median_time

CUDA_SHAPES = [(4096, 384, 6144, 32), (4096, 768, 24576, 32), (8192, 4096, 65536, 64)]
CPU_SHAPES = [(1024, 384, 6144, 32), (1024, 768, 12288, 32)]
QUICK_SHAPES = [(256, 128, 2048, 16), (512, 384, 6144, 32)]
OPS = ["embed", "gather_dot", "scatter_outer", "decode_fwd_bwd", "encoder_grad"]


@dataclass
class Row:
    op: str
    B: int
    D: int
    L: int
    K: int
    backend: str
    ms: float
    gb_s: float
    tflop_s: float
    dense_ms: float
    speedup: float
    err: float


@contextlib.contextmanager
def kernel_env(**env: str) -> Iterator[None]:
    """Set SAE_KERNEL_* variables for the autograd ops, restoring them afterwards."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def model_bytes(op: str, B: int, D: int, L: int, K: int, s: int, i: int) -> int:
    embed = B * K * (i + s) + B * K * D * s + 4 * B * D
    gather = B * K * i + B * D * s + B * K * D * s + 4 * B * K
    scatter = B * K * (i + s) + B * K * D * s + 4 * L * D
    return {"embed": embed, "gather_dot": gather, "scatter_outer": scatter,
            "decode_fwd_bwd": embed + gather + scatter, "encoder_grad": scatter + embed + 4 * B * K}[op]


MACS = {"embed": 1, "gather_dot": 1, "scatter_outer": 1, "decode_fwd_bwd": 3, "encoder_grad": 2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def make_inputs(B: int, D: int, L: int, K: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.rand(B, L, generator=g, device=device).topk(K, dim=1).indices  # distinct per row
    vals = torch.rand(B, K, generator=g, device=device, dtype=dtype)
    W = torch.randn(L, D, generator=g, device=device, dtype=dtype) / D**0.5
    y = torch.randn(B, D, generator=g, device=device, dtype=dtype)
    S = torch.zeros(B, L, device=device, dtype=dtype).scatter_(1, idx, vals)
    return dict(idx=idx, vals=vals, W=W, y=y, S=S)


def sparse_fns(ops, t: dict, L: int, backend_env: dict[str, str]) -> dict[str, Callable[[], torch.Tensor]]:
    idx, vals, W, y = t["idx"], t["vals"], t["W"], t["y"]
    vals_g, W_g, y_g = (v.detach().requires_grad_() for v in (vals, W, y))
    b_enc = torch.zeros(L, device=W.device, dtype=W.dtype, requires_grad=True)

    def decode_fwd_bwd():
        with kernel_env(**backend_env):
            sparse_decode(idx, vals_g, W_g).backward(y)
        return W_g.grad

    def encoder_grad():
        with kernel_env(**backend_env):
            gather_encode(y_g, W_g, b_enc, idx, vals).backward(vals)
        return W_g.grad

    def fresh(fn):  # gradients of one call, not accumulated over the timing loop
        def run():
            for p in (vals_g, W_g, y_g, b_enc):
                p.grad = None
            return fn()
        return run

    return {
        "embed": lambda: ops.embed(idx, vals, W),
        "gather_dot": lambda: ops.gather_dot(y, W, idx),
        "scatter_outer": lambda: ops.scatter_outer(idx, vals, y, L, W),
        "decode_fwd_bwd": fresh(decode_fwd_bwd),
        "encoder_grad": fresh(encoder_grad),
    }


def dense_fns(t: dict, K: int) -> dict[str, Callable[[], torch.Tensor]]:
    idx, W, y, S = t["idx"], t["W"], t["y"], t["S"]
    return {
        "embed": lambda: S @ W,
        "gather_dot": lambda: (y @ W.T).gather(1, idx),
        "scatter_outer": lambda: S.T @ y,
        "decode_fwd_bwd": lambda: (S @ W, y @ W.T, S.T @ y)[2],
        "encoder_grad": lambda: (S.T @ y, S @ W)[0],
    }


def backends(device: torch.device) -> list[tuple[str, object, dict[str, str]]]:
    out: list[tuple[str, object, dict[str, str]]] = [("eager", eager, {"SAE_KERNEL_BACKEND": "eager"})]
    # As in dispatch: CUDA, or Triton's CPU interpreter (to check this script, not to time it).
    if triton_available() and (device.type == "cuda" or triton_interpreting()):
        from sae_kernels import triton_ops

        for name, det in (("triton", "1"), ("triton-atomic", "0")):
            env = {"SAE_KERNEL_BACKEND": "triton", "SAE_KERNEL_DETERMINISTIC": det}
            out.append((name, _Strategy(triton_ops, det == "1"), env))
    return out


class _Strategy:
    """triton_ops with the scatter strategy fixed, for the direct scatter_outer timing."""

    def __init__(self, mod, deterministic: bool):
        self.mod, self.deterministic = mod, deterministic

    def __getattr__(self, name):
        return getattr(self.mod, name)

    def scatter_outer(self, *args):
        return self.mod.scatter_outer(*args, deterministic=self.deterministic)


def bench_shape(B: int, D: int, L: int, K: int, dtype: torch.dtype, device: torch.device, reps: int) -> list[Row]:
    t = make_inputs(B, D, L, K, dtype, device)
    s, i = t["W"].element_size(), t["idx"].element_size()
    dense = dense_fns(t, K)
    dense_ms = {op: 1e3 * median_time(fn, device, repeats=reps) for op, fn in dense.items()}
    dense_out = {op: fn() for op, fn in dense.items()}
    rows = []
    for name, ops, env in backends(device):
        for op, fn in sparse_fns(ops, t, L, env).items():
            sec = median_time(fn, device, repeats=reps)
            rows.append(Row(
                op=op, B=B, D=D, L=L, K=K, backend=name, ms=1e3 * sec,
                gb_s=model_bytes(op, B, D, L, K, s, i) / sec / 1e9,
                tflop_s=2 * MACS[op] * B * K * D / sec / 1e12,
                dense_ms=dense_ms[op], speedup=dense_ms[op] / (1e3 * sec), err=rel_err(fn(), dense_out[op]),
            ))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = []
    for op in OPS:
        lines += [f"\n### {op}\n", "| B | D | L | K | backend | ms | GB/s | TFLOP/s | dense ms | speed-up | err |",
                  "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r.op == op):
            lines.append(f"| {r.B} | {r.D} | {r.L} | {r.K} | {r.backend} | {r.ms:.3f} | {r.gb_s:.1f} | "
                         f"{r.tflop_s:.3f} | {r.dense_ms:.3f} | {r.speedup:.1f}x | {r.err:.1e} |")
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    try:
        shapes = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 or min(s) <= 0 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes={text!r}; use B,D,L,K[;B,D,L,K...] with positive integers")
    return shapes  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--shapes", type=parse_shapes, default=None, help="B,D,L,K;... (overrides the grid)")
    p.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions (default 5, 3 with --quick)")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    reps = args.reps or (3 if args.quick else 5)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    rows = []
    for B, D, L, K in shapes:
        rows += bench_shape(B, D, L, K, dtype, device, reps)
    print(f"## Sparse TopK kernels vs dense, {name}, {args.dtype}, median of {reps}")
    if device.type == "cpu" and triton_interpreting():
        print("\nTriton rows ran in Triton's CPU interpreter: their times say nothing about GPU speed.")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "dtype": args.dtype, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
