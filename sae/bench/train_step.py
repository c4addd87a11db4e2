"""Training-step benchmark: how close is an SAE step to the cost of its encoder matmul?

    python -m sae.bench.train_step [--d 384 --expansion 16 --k 32 --batch 4096 --device cpu]
                                   [--arch topk,jumprelu] [--jumprelu-dense]

Prints, for one SAE step of each architecture (forward, backward, decoder-gradient projection,
clip, Adam, decoder renormalisation, dead-latent update; the trainer's own ``train_step`` after its
data-dependent init): median step time, tokens/s, the L0 the step ran at, peak memory, the ratio
of step time to one encoder product ``x @ W_enc^T`` of the same shape measured in the same run, and
the ratio to the first architecture's step. The encoder product is the floor: every SAE must
compute it, so a ratio near 1 means everything else (selection, sparse decode, sparse backward,
optimiser) is cheap. The matmul is timed twice: into a fresh tensor (what an allocating step pays)
and into a preallocated one (pure compute).

The architectures' steps are timed in interleaved rounds (one step of each per round), so the
ratios between rows see the same machine load even on a shared machine. The data init puts
JumpReLU's thresholds at L0 ~ k, so its row compares with TopK at the same sparsity;
``--jumprelu-dense`` adds a row for JumpReLU trained through its dense reference backward
(``JumpReLUSAE.dense_backward``). Peak RSS is the whole process's (every row's trainer is alive).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from sae.bench.common import markdown_table, median_time, peak_rss_mib, sync
from sae.buffer.source import Batch
from sae.models import SAEConfig, build_sae, l0_per_token
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer


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


class _Variant:
    """One architecture's trainer on a fixed batch, after the data init."""

    def __init__(self, arch: str, x: torch.Tensor, cfg_sae: SAEConfig, cfg: TrainConfig, dense_backward: bool):
        self.sae = build_sae(cfg_sae, x.shape[1], seed=0).to(x.device)
        if dense_backward:
            self.sae.dense_backward = True  # JumpReLU's reference path
        self.x, self.batch = x, Batch(x)
        self.trainer = Trainer(cfg, {arch: self.sae}, _FixedSource(x))
        self.trainer.init_from_data(self.batch)  # b_dec, encoder scale, JumpReLU thresholds at L0 ~ k

    def step(self) -> None:
        self.trainer.train_step(self.batch)

    def l0(self) -> float:
        with torch.no_grad():
            return l0_per_token(self.sae(self.x).codes).mean().item()


def run(d: int, expansion: int, k: int, batch: int, variants: list[tuple[str, bool]], device: str, repeats: int,
        dead_fraction: float, selection_dtype: str = "auto") -> dict[str, dict[str, float]]:
    """Figures per variant ``(architecture, dense_backward)``, keyed by its row name."""
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(batch, d, device=dev)
    rows: dict[str, _Variant] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, dense in variants:
            name = f"{arch} (dense backward)" if dense else arch
            cfg_sae = SAEConfig(architecture=arch, expansion_factor=expansion, k=k, selection_dtype=selection_dtype)
            cfg = TrainConfig(batch_size=batch, steps=10**9, lr=1e-4, lr_warmup_steps=0, device=device,
                              progress=False, log_every=10**9, out_dir=f"{tmp}/{len(rows)}",
                              dead_tokens_threshold=10_000_000)
            rows[name] = v = _Variant(arch, x, cfg_sae, cfg, dense)
            if dead_fraction > 0:  # exercise AuxK: mark a fraction of latents dead
                n_dead = int(dead_fraction * v.sae.num_latents)
                v.trainer.trackers[arch].tokens_since_fired[:n_dead] = cfg.dead_tokens_threshold
        times = interleaved_times({name: v.step for name, v in rows.items()}, dev, repeats=repeats)
    W = next(iter(rows.values())).sae.W_enc.detach()
    out = torch.empty(batch, W.shape[0], device=dev)
    mm_alloc = median_time(lambda: x @ W.T, dev, repeats=repeats)
    mm_prealloc = median_time(lambda: torch.mm(x, W.T, out=out), dev, repeats=repeats)
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
    return {name: {
        "step_ms": 1e3 * times[name], "tokens_per_s": batch / times[name], "l0": v.l0(), "matmul_ms": 1e3 * mm_alloc,
        "matmul_prealloc_ms": 1e3 * mm_prealloc, "ratio": times[name] / mm_alloc,
        "ratio_prealloc": times[name] / mm_prealloc, "peak_rss_mib": peak_rss_mib(), "peak_cuda_mib": peak_cuda,
    } for name, v in rows.items()}


def interleaved_times(steps: dict[str, Callable[[], None]], device: torch.device, *, warmup: int = 2,
                      repeats: int = 9) -> dict[str, float]:
    """Median seconds of each callable, timed in rounds that call each once."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32, help="TopK's k; JumpReLU's initial L0 target")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--arch", default="topk,jumprelu", help="comma-separated architectures, one row each")
    p.add_argument("--jumprelu-dense", action="store_true", help="add JumpReLU through its dense reference backward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--dead-fraction", type=float, default=0.0, help="fraction of latents marked dead (AuxK cost)")
    p.add_argument("--selection-dtype", default="auto", help="sae.selection_dtype (auto | float32 | bfloat16)")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args(argv)
    variants = [(arch, False) for arch in a.arch.split(",") if arch]
    if a.jumprelu_dense:
        variants.append(("jumprelu", True))
    results = run(a.d, a.expansion, a.k, a.batch, variants, a.device, a.repeats, a.dead_fraction, a.selection_dtype)
    print(f"d={a.d}, latents={a.d * a.expansion}, k={a.k}, batch={a.batch}, device={a.device}, "
          f"threads={torch.get_num_threads()}, dead fraction={a.dead_fraction}, selection dtype={a.selection_dtype}")
    first = next(iter(results))
    print(markdown_table(
        ["architecture", "L0", "step ms", "tokens/s", "x@W_enc ms", "x@W_enc (prealloc) ms", "step / matmul",
         "step / matmul (prealloc)", f"step / {first} step", "peak RSS MiB"],
        [[name, r["l0"], r["step_ms"], r["tokens_per_s"], r["matmul_ms"], r["matmul_prealloc_ms"], r["ratio"],
          r["ratio_prealloc"], r["step_ms"] / results[first]["step_ms"], r["peak_rss_mib"]]
         for name, r in results.items()],
    ))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
