"""One TopK training step on the device: ours (several configurations) and sparsify's, with the floor.

Part of ``python -m sae.bench.gpu``. Each row times ``steps`` consecutive training steps after
``warmup`` steps, synchronising only at the ends (the way a training loop runs: the host queues
kernels ahead of the GPU; our trainer reads the device only at log steps). Ours is the trainer's
real ``train_step`` after its data-dependent init (b_dec from the geometric median, encoder scale),
with the default TrainConfig (log every 10 steps, grad clip 1, LR scaling rule) unless a row says
otherwise. sparsify's row is its TopK training loop (``SparseCoder`` forward, FVU backward,
decoder-gradient projection, Adam, unit-norm decoder, dead-latent counters).

The ``fvu_after`` figure (FVU on the timed batch after the timed steps) is a sanity check that a
configuration trains the same SAE as the others, not a quality comparison: our default LR warm-up
is still in its first steps, sparsify's loop has none.

The floor of a step with fp32 weights, dense gradients and Adam: the bf16 encoder GEMM plus 32
bytes per parameter (read param, grad, 2 moments; write param, 2 moments; write the gradient)
at the device's measured copy bandwidth.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable

import torch

from sae.buffer.source import Batch
from sae.models import SAEConfig, build_sae
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer

from .common import sync

SHAPES = [(768, 24576, 32), (2304, 36864, 64), (4096, 131072, 64)]  # (d, latents, k)
CPU_SHAPES = [(64, 1024, 8), (128, 2048, 16)]


def time_loop(step: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Milliseconds per call over ``steps`` back-to-back calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return 1e3 * (time.perf_counter() - t) / steps


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Device copy bandwidth in bytes/s (read + write of ``nbytes``)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_loop(lambda: dst.copy_(src), device, steps=10, warmup=2)
    return 2 * nbytes / (ms / 1e3)


def gemm_ms(d: int, L: int, B: int, dtype: torch.dtype, device: torch.device) -> float:
    """``x @ W^T`` for x [B, d], W [L, d] into a preallocated output."""
    x = torch.randn(B, d, device=device).to(dtype)
    W = torch.randn(L, d, device=device).to(dtype)
    out = torch.empty(B, L, device=device, dtype=dtype)
    ms = time_loop(lambda: torch.mm(x, W.T, out=out), device, steps=20, warmup=3)
    return ms


def activations(d: int, B: int, device: torch.device) -> torch.Tensor:
    """A low-rank-plus-noise cloud with an offset (closer to model activations than white noise)."""
    g = torch.Generator(device=device).manual_seed(0)
    basis = torch.randn(max(1, d // 4), d, device=device, generator=g) / d**0.5
    return (torch.randn(B, basis.shape[0], device=device, generator=g) @ basis) * 3 \
        + 0.3 * torch.randn(B, d, device=device, generator=g) + 1.0


class _FixedSource:
    def __init__(self, x: torch.Tensor):
        self.x, self.d_in, self.d_out = x, x.shape[1], x.shape[1]

    def __iter__(self):
        while True:
            yield Batch(self.x)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


#: Our configurations: name -> (SAEConfig overrides, TrainConfig overrides).
OURS = {
    "ours (defaults)": ({}, {}),
    "ours exact (train.deterministic=true)": ({}, {"deterministic": True}),
    "ours bf16 autocast (train.mixed_precision=bf16)": ({}, {"mixed_precision": "bf16"}),
    "ours bf16 Adam states (train.adam_state_dtype=bfloat16)": ({}, {"adam_state_dtype": "bfloat16"}),
    "ours without CUDA graphs (train.cuda_graphs=false)": ({}, {"cuda_graphs": False}),
}


def measure_ours(name: str, x: torch.Tensor, L: int, k: int, device: torch.device, steps: int,
                 warmup: int) -> dict:
    sae_kw, train_kw = OURS[name]
    d, B = x.shape[1], x.shape[0]
    sae = build_sae(SAEConfig(architecture="topk", num_latents=L, k=k, **sae_kw), d, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(batch_size=B, steps=10**9, device=str(device), progress=False, out_dir=tmp, eval_every=0,
                          final_report=False, **train_kw)
        trainer = Trainer(cfg, {"topk": sae}, _FixedSource(x))
        batch = Batch(x)
        trainer.init_from_data(batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = time_loop(lambda: trainer.train_step(batch), device, steps, warmup)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        with torch.no_grad():
            fvu = float(trainer.saes["topk"](x).losses["fvu"])
        fused = trainer.fused_step
        graphed = {n: g.captured for n, g in trainer.graphed.graphs.items()}
        off = dict(trainer.graphed.off)
    return {"ms": ms, "peak_gib": peak, "fvu_after": fvu, "fused_step": fused, "cuda_graph": graphed,
            "eager_because": off}


def measure_sparsify(x: torch.Tensor, L: int, k: int, device: torch.device, steps: int, warmup: int) -> dict:
    """sparsify's TopK loop (its trainer's step without data loading); raises ImportError if absent."""
    from sparsify import SparseCoder, SparseCoderConfig

    d, B = x.shape[1], x.shape[0]
    sae = SparseCoder(d, SparseCoderConfig(activation="topk", num_latents=L, k=k), device=device,
                      dtype=torch.float32)
    sae.b_dec.data = x.mean(0)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (L / 2**14) ** 0.5)
    since_fired = torch.zeros(L, dtype=torch.long, device=device)
    did_fire = torch.zeros(L, dtype=torch.bool, device=device)
    total_variance = (x - x.mean(0)).pow(2).sum()

    def step():
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(B)
            since_fired[did_fire] = 0
            did_fire.zero_()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = time_loop(step, device, steps, warmup)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    with torch.no_grad():
        fvu = float(sae(x=x, y=x, total_variance=total_variance).fvu)
    return {"ms": ms, "peak_gib": peak, "fvu_after": fvu}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_shape(d: int, L: int, k: int, B: int, device: torch.device, bandwidth: float, *, steps: int,
                  warmup: int, ours: list[str], log=print) -> dict:
    """Every row of one shape, with the GEMM times, the floor and the ratios."""
    params = 2 * L * d + L + d
    row = {"d": d, "L": L, "k": k, "B": B, "params": params,
           "gemm_bf16_ms": gemm_ms(d, L, B, torch.bfloat16, device),
           "gemm_fp32_ms": gemm_ms(d, L, B, torch.float32, device)}
    row["floor_ms"] = row["gemm_bf16_ms"] + 1e3 * 32 * params / bandwidth
    x = activations(d, B, device)
    variants = {}
    for name in ours:
        try:
            variants[name] = measure_ours(name, x, L, k, device, steps, warmup)
        except Exception as e:  # noqa: BLE001 (a failing row is reported, the others still run)
            variants[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        free(device)
        log(f"  d={d} L={L} k={k} {name}: {_short(variants[name])}")
    try:
        variants["sparsify"] = measure_sparsify(x, L, k, device, steps, warmup)
    except ImportError as e:
        variants["sparsify"] = {"skipped": f"sparsify does not import ({e})"}
    except Exception as e:  # noqa: BLE001
        variants["sparsify"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    free(device)
    log(f"  d={d} L={L} k={k} sparsify: {_short(variants['sparsify'])}")
    sp = variants["sparsify"].get("ms")
    timed = {n: v for n, v in variants.items() if "ms" in v and n != "sparsify"}
    if timed:
        fastest = min(timed, key=lambda n: timed[n]["ms"])
        row["fastest"] = fastest
    for v in variants.values():
        if "ms" in v:
            v["tokens_per_s"] = B / v["ms"] * 1e3
            v["step_over_floor"] = v["ms"] / row["floor_ms"]
            if sp:
                v["speedup_vs_sparsify"] = sp / v["ms"]
    row["variants"] = variants
    del x
    free(device)
    return row


def _short(v: dict) -> str:
    if "ms" in v:
        return f"{v['ms']:.2f} ms/step, peak {v['peak_gib']:.2f} GiB, fvu {v['fvu_after']:.4f}"
    return v.get("error") or v.get("skipped", "?")
