"""What a latent-parallel cross-layer transcoder needs per rank: memory, and ranks to fit a device.

``python -m sae.bench.clt_memory`` prints, for SmolLM2-135M's shape by default (30 layers,
d_model 576) at several widths, the parameters per rank and the bytes of training state per rank
(fp32 weights, gradients and Adam's two moments: 16 bytes a parameter) plus the step's activations
for a batch, and the fewest latent-parallel ranks whose share fits a device.

The parameter count is the layout of :class:`sae.models.clt.CrossLayerTranscoder` under
``train.parallel=latent`` (every layer's group split alike over the W ranks, ``b_dec`` whole on
each): per rank ``W_enc`` N (L/W) M, ``b_enc`` and a JumpReLU's ``log_threshold`` N (L/W) each,
``W_dec`` (L/W) M N(N+1)/2 (latents of layer i write layers i..N-1; the acausal crosscoder: N^2
M (L/W) and an encoder reading N M), ``b_dec`` N M; ``tests/bench/test_clt_memory.py`` checks it
against the parameters of a real latent shard. Activations per token: the inputs and targets
(2 N M), and per rank the JumpReLU's dense pre-activations, codes and their gradients
(about 4 N L/W floats; TopK families decode sparsely and hold less).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GIB = 2**30
STATE_BYTES = 16  # fp32 weight + gradient + Adam m + Adam v


@dataclass
class CLTShape:
    n_layers: int
    d_model: int
    latents_per_layer: int
    acausal: bool = False

    def params_per_rank(self, world_size: int = 1, jumprelu: bool = True) -> int:
        """Parameters of one latent-parallel rank's shard (``latents_per_layer`` divisible by ``world_size``)."""
        if self.latents_per_layer % world_size:
            raise ValueError(f"{self.latents_per_layer} latents per layer do not split over {world_size} ranks")
        N, M, L = self.n_layers, self.d_model, self.latents_per_layer // world_size
        enc_in = N * M if self.acausal else M
        writes = N * N if self.acausal else N * (N + 1) // 2
        return N * L * enc_in + N * L * (2 if jumprelu else 1) + L * M * writes + N * M

    def bytes_per_rank(self, world_size: int = 1, batch: int = 4096) -> int:
        N, M, L = self.n_layers, self.d_model, self.latents_per_layer // world_size
        activations = batch * (2 * N * M + 4 * N * L) * 4
        return self.params_per_rank(world_size) * STATE_BYTES + activations

    def ranks_to_fit(self, device_bytes: float, batch: int = 4096, reserve: float = 0.1) -> int:
        """The fewest ranks (dividing the latents per layer) whose share fits ``device_bytes`` with
        ``reserve`` of it left for the allocator and the framework; 0: none does."""
        for w in range(1, self.latents_per_layer + 1):
            if self.latents_per_layer % w == 0 and self.bytes_per_rank(w, batch) <= device_bytes * (1 - reserve):
                return w
        return 0


def table(n_layers: int, d_model: int, expansions: list[int], device_gib: float, batch: int) -> str:
    rows = ["| width | latents per layer | parameters | state + activations, 1 rank | ranks for "
            f"{device_gib:g} GiB | per rank there |", "|---|---:|---:|---:|---:|---:|"]
    for x in expansions:
        s = CLTShape(n_layers, d_model, x * d_model)
        w = s.ranks_to_fit(device_gib * GIB, batch)
        there = f"{s.bytes_per_rank(w, batch) / GIB:.1f} GiB" if w else "-"
        rows.append(f"| {x}x | {s.latents_per_layer:,} | {s.params_per_rank() / 1e9:.2f}G | "
                    f"{s.bytes_per_rank(1, batch) / GIB:.1f} GiB | {w or 'none'} | {there} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--expansions", default="2,8,32", help="latents per layer as multiples of d_model")
    p.add_argument("--device-gib", type=float, default=80.0, help="memory of one device (H100: 80)")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    a = p.parse_args(argv)
    if not math.isfinite(a.device_gib) or a.device_gib <= 0:
        raise SystemExit("--device-gib must be > 0")
    print(f"JumpReLU CLT over {a.layers} layers of d_model {a.d_model}, {a.batch} tokens a step, fp32 + Adam, "
          f"10% of each device kept free:")
    print(table(a.layers, a.d_model, [int(x) for x in a.expansions.split(",")], a.device_gib, a.batch))


if __name__ == "__main__":
    main()
