"""Feature absorption on a toy with hierarchical features: Matryoshka vs plain BatchTopK/TopK.

Absorption (Chanin et al. 2024, "A is for Absorption"): when a specific feature (a child, e.g.
"starts with S" inside "short") always implies a general one (its parent), a sparse coder saves
one latent per token by folding the parent's direction into each child's latent; the parent's
latent then stays silent exactly where the parent is present together with a child.

Toy (Bussmann et al. 2025, sec. 3): ``parents`` parent features, each with ``children`` child
features; a parent is active with probability ``p_parent``; when it is, one of its children
(uniform) is active too with probability ``p_child``; children never fire without their parent.
Directions are random unit vectors in R^d, magnitudes |N(1, 0.1)|.

Absorption rate of a trained SAE: for each parent, its latent is the decoder row closest in
cosine to the parent's direction; the rate is the fraction of tokens with that parent and one
of its children active on which the parent's latent does not fire (0 when a parent latent fires
whenever its parent is present). A parent without a latent of cosine >= ``match_cos`` counts as
fully absorbed (rate 1). The printed figure is the mean over parents.

    python -m sae.bench.absorption [--steps 500] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor

from sae.models import SAEConfig, SparseCodes, build_sae
from sae.models.base import SparseCoder


@dataclass
class HierarchyToy:
    parents: int = 8
    children: int = 4
    d: int = 48
    p_parent: float = 0.15
    p_child: float = 0.8
    seed: int = 0

    def features(self) -> Tensor:
        """[parents + parents * children, d] unit directions: parents first, then each parent's children."""
        g = torch.Generator().manual_seed(self.seed)
        F = torch.randn(self.parents * (1 + self.children), self.d, generator=g)
        return F / F.norm(dim=1, keepdim=True)

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """(x [n, d], child_active [n, parents]: a child of that parent is active)."""
        g = torch.Generator().manual_seed(10_007 * seed + 1)
        P, C = self.parents, self.children
        parent = torch.rand(n, P, generator=g) < self.p_parent
        with_child = parent & (torch.rand(n, P, generator=g) < self.p_child)
        which = torch.randint(0, C, (n, P, 1), generator=g)
        child = torch.zeros(n, P, C, dtype=torch.bool).scatter_(2, which, with_child.unsqueeze(2))
        active = torch.cat([parent, child.reshape(n, P * C)], 1).float()
        mags = (1 + 0.1 * torch.randn(active.shape, generator=g)).abs()
        return (active * mags) @ self.features(), with_child

    def expected_l0(self) -> float:
        return self.parents * self.p_parent * (1 + self.p_child)


def dense_codes(sae: SparseCoder, x: Tensor) -> Tensor:
    with torch.no_grad():
        codes = sae.eval().encode(x)
    if isinstance(codes, SparseCodes):
        return torch.zeros(x.shape[0], sae.num_latents).scatter_add_(1, codes.idx.long(), codes.vals.float())
    return codes.float()


def absorption_rate(sae: SparseCoder, toy: HierarchyToy, x: Tensor, with_child: Tensor,
                    match_cos: float = 0.9) -> dict[str, float]:
    """Mean absorption rate over parents (module docstring), the parents' best cosines and L0."""
    W = sae.W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
    cos, latent = (toy.features()[: toy.parents] @ W.T).max(1)
    codes = dense_codes(sae, x)
    fired = codes[:, latent] > 0
    rate = (with_child & ~fired).sum(0).float() / with_child.sum(0).clamp_min(1)
    rate = torch.where(cos >= match_cos, rate, torch.ones_like(rate))
    return {"absorption": rate.mean().item(), "parent_cos": cos.mean().item(),
            "l0": (codes > 0).sum(1).float().mean().item()}


def train_on_toy(arch: str, toy: HierarchyToy, *, k: int, num_latents: int = 64, groups: list[int] | None = None,
                 steps: int = 500, batch_size: int = 512, seed: int = 1) -> SparseCoder:
    from sae.train.config import TrainConfig
    from sae.train.trainer import Trainer

    cfg = SAEConfig(architecture=arch, num_latents=num_latents, k=k, matryoshka_groups=list(groups or []))
    sae = build_sae(cfg, toy.d, seed=seed)
    x, _ = toy.sample(steps * batch_size, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        tc = TrainConfig(batch_size=batch_size, steps=steps, lr=1e-2, lr_warmup_steps=10, progress=False,
                         log_every=max(steps // 5, 1), out_dir=f"{d}/run", resume=False, dead_tokens_threshold=20_000,
                         deterministic=True)
        Trainer(tc, {"sae": sae}, x).fit()
    return sae


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--groups", type=int, nargs="+", default=[16, 48], help="Matryoshka group sizes")
    args = ap.parse_args(argv)
    toy = HierarchyToy()
    k = round(toy.expected_l0())
    x, with_child = toy.sample(20_000, seed=10**6)
    print(f"toy: {toy.parents} parents x {toy.children} children in d={toy.d}, expected L0 {toy.expected_l0():.2f}; "
          f"64 latents, k={k}, {args.steps} steps of 512 tokens")
    print(f"{'architecture':<22} {'seed':>4} {'absorption':>10} {'parent cos':>10} {'L0':>6}")
    rows = [("batchtopk", None), ("matryoshka_batchtopk", args.groups), ("topk", None),
            ("matryoshka_topk", args.groups)]
    for arch, groups in rows:
        for seed in args.seeds:
            sae = train_on_toy(arch, toy, k=k, groups=groups, steps=args.steps, seed=seed)
            r = absorption_rate(sae, toy, x, with_child)
            print(f"{arch:<22} {seed:>4} {r['absorption']:>10.3f} {r['parent_cos']:>10.3f} {r['l0']:>6.2f}")


if __name__ == "__main__":
    main()
