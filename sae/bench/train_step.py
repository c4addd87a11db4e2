"""Training-step benchmark: how close is a TopK step to the cost of its encoder matmul?

    python -m sae.bench.train_step [--d 384 --expansion 16 --k 32 --batch 4096 --device cpu]

Prints, for one SAE step (forward, backward, decoder-gradient projection, clip, Adam, decoder
renormalisation, dead-latent update; the trainer's own ``train_step``): median step time,
tokens/s, peak memory, and the ratio of step time to one encoder product ``x @ W_enc^T`` of the
same shape measured in the same run. The encoder product is the floor: every SAE must compute
it, so a ratio near 1 means everything else (top-k, sparse decode, sparse backward, optimiser) is
cheap. The matmul is timed twice: into a fresh tensor (what an allocating step pays) and into a
preallocated one (pure compute).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from sae.bench.common import markdown_table, median_time, peak_rss_mib
from sae.buffer.source import Batch
from sae.models import SAEConfig, build_sae
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


def run(d: int, expansion: int, k: int, batch: int, arch: str, device: str, repeats: int,
        dead_fraction: float, selection_dtype: str = "auto") -> dict[str, float]:
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(batch, d, device=dev)
    cfg_sae = SAEConfig(architecture=arch, expansion_factor=expansion, k=k, selection_dtype=selection_dtype)
    sae = build_sae(cfg_sae, d, seed=0).to(dev)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(batch_size=batch, steps=10**9, lr=1e-4, lr_warmup_steps=0, device=device,
                          progress=False, log_every=10**9, out_dir=tmp, dead_tokens_threshold=10_000_000)
        trainer = Trainer(cfg, {arch: sae}, _FixedSource(x))
        if dead_fraction > 0:  # exercise AuxK: mark a fraction of latents dead
            n_dead = int(dead_fraction * sae.num_latents)
            trainer.trackers[arch].tokens_since_fired[:n_dead] = cfg.dead_tokens_threshold
        batch_obj = Batch(x)
        step = median_time(lambda: trainer.train_step(batch_obj), dev, repeats=repeats)
    W = sae.W_enc.detach()
    out = torch.empty(batch, sae.num_latents, device=dev)
    mm_alloc = median_time(lambda: x @ W.T, dev, repeats=repeats)
    mm_prealloc = median_time(lambda: torch.mm(x, W.T, out=out), dev, repeats=repeats)
    return {
        "step_ms": 1e3 * step, "tokens_per_s": batch / step, "matmul_ms": 1e3 * mm_alloc,
        "matmul_prealloc_ms": 1e3 * mm_prealloc, "ratio": step / mm_alloc, "ratio_prealloc": step / mm_prealloc,
        "peak_rss_mib": peak_rss_mib(),
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--arch", default="topk")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--dead-fraction", type=float, default=0.0, help="fraction of latents marked dead (AuxK cost)")
    p.add_argument("--selection-dtype", default="auto", help="sae.selection_dtype (auto | float32 | bfloat16)")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args(argv)
    r = run(a.d, a.expansion, a.k, a.batch, a.arch, a.device, a.repeats, a.dead_fraction, a.selection_dtype)
    print(f"{a.arch} SAE, d={a.d}, latents={a.d * a.expansion}, k={a.k}, batch={a.batch}, "
          f"device={a.device}, threads={torch.get_num_threads()}, dead fraction={a.dead_fraction}, "
          f"selection dtype={a.selection_dtype}")
    print(markdown_table(
        ["step ms", "tokens/s", "x@W_enc ms", "x@W_enc (prealloc) ms", "step / matmul", "step / matmul (prealloc)",
         "peak RSS MiB"],
        [[r["step_ms"], r["tokens_per_s"], r["matmul_ms"], r["matmul_prealloc_ms"], r["ratio"], r["ratio_prealloc"],
          r["peak_rss_mib"]]],
    ))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), **r}, fh, indent=2)


if __name__ == "__main__":
    main()
