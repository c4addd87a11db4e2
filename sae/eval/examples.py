"""Top-activating examples: for a sample of latents, the token contexts where each fires most.

Latents are sampled among those that fired, spread over their firing-frequency range (one per
equal-size stratum of the frequency order, seeded), so a report shows rare, typical and dense
latents alike. One pass over the eval rows records the sampled latents' non-zero activations
and every row's (token id, position, context); an example is the strongest activation of a
latent in one context, shown with ``before``/``after`` tokens of that context around it (rows of
a context are consecutive in the buffer, in position order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sae.models import Codes, SparseCoder, SparseCodes

from .dashboards import Dashboard, activation_histogram, token_strings
from .data import EvalSet


@dataclass
class Example:
    context: int
    """Context index (harvest order)."""
    position: int
    """Position of the activating token in its context."""
    tokens: list[str]
    """Decoded tokens shown (the activating one and its neighbours)."""
    acts: list[float]
    """The latent's activation on each shown token (0 where it did not fire)."""
    focus: int
    """Index in ``tokens`` of the activating token."""
    value: float


@dataclass
class LatentExamples:
    latent: int
    frequency: float
    max_activation: float
    examples: list[Example]
    dashboard: Dashboard = field(default_factory=Dashboard)
    """Histogram of its activations, decoder neighbours, promoted/suppressed tokens (:mod:`.dashboards`)."""


def pick_latents(frequencies_L: Tensor, n: int, seed: int = 0) -> list[int]:
    """``n`` latents that fired, one from each of ``n`` equal strata of the frequency order."""
    alive = (frequencies_L > 0).nonzero().flatten()
    if alive.numel() == 0 or n == 0:
        return []
    order = alive[frequencies_L[alive].argsort(stable=True)]
    n = min(n, order.numel())
    gen = torch.Generator().manual_seed(seed)
    bounds = torch.linspace(0, order.numel(), n + 1).long().tolist()
    picks = [int(order[a + int(torch.randint(b - a, (1,), generator=gen))]) for a, b in zip(bounds, bounds[1:])]
    return sorted(set(picks), key=lambda i: -float(frequencies_L[i]))


def latent_values(codes: Codes, latents: Tensor) -> Tensor:
    """[N, S] activation of each of ``latents`` [S] on each row, from sparse or dense codes."""
    if isinstance(codes, SparseCodes):
        hit = codes.idx[:, :, None] == latents.to(codes.idx.device)[None, None, :]
        return (codes.vals[:, :, None] * hit).sum(1)
    return codes[:, latents.to(codes.device)]


@torch.no_grad()
def top_examples(sae: SparseCoder, rows: EvalSet, latents: list[int], tokenizer: Any, *, per_latent: int,
                 before: int, after: int, device: torch.device | str = "cpu", bins: int = 24
                 ) -> list[LatentExamples]:
    """Top contexts of ``latents`` over ``rows`` (which must carry token ids), and the histogram
    (``bins`` bins) of each latent's non-zero activations.

    Raises:
        ValueError: rows without token ids (synthetic data).
    """
    if not latents:
        return []
    lat = torch.tensor(latents)
    hits_r, hits_s, hits_v, meta = [], [], [], {"token_ids": [], "positions": [], "contexts": []}
    offset = 0
    was_training = sae.training
    sae.eval()
    try:
        for b in rows:
            if b.token_ids is None:
                raise ValueError(f"{rows.source} rows carry no token ids: top-activating examples need real tokens")
            vals = latent_values(sae.encode(b.x.to(device)), lat).float().cpu()
            r, s = vals.nonzero(as_tuple=True)
            hits_r.append(r + offset), hits_s.append(s), hits_v.append(vals[r, s])
            for k in meta:
                meta[k].append(getattr(b, k))
            offset += b.x.shape[0]
    finally:
        sae.train(was_training)
    if offset == 0:
        return []
    r_all, s_all, v_all = torch.cat(hits_r), torch.cat(hits_s), torch.cat(hits_v)
    ids, pos, ctx = (torch.cat(meta[k]).long() for k in ("token_ids", "positions", "contexts"))
    out = []
    for si, latent in enumerate(latents):
        mask = s_all == si
        rows_s, vals_s = r_all[mask], v_all[mask]
        act_of = dict(zip(rows_s.tolist(), vals_s.tolist()))
        examples, seen = [], set()
        for j in vals_s.argsort(descending=True, stable=True).tolist():
            r = int(rows_s[j])
            c = int(ctx[r])
            if c in seen:
                continue
            seen.add(c)
            lo, hi = max(0, r - before), min(offset, r + after + 1)
            window = [i for i in range(lo, hi) if int(ctx[i]) == c]
            examples.append(Example(c, int(pos[r]), token_strings(tokenizer, ids[window].tolist()),
                                    [act_of.get(i, 0.0) for i in window], window.index(r), float(vals_s[j])))
            if len(examples) == per_latent:
                break
        out.append(LatentExamples(latent, float(mask.sum()) / offset, float(vals_s.max()) if vals_s.numel() else 0.0,
                                  examples, Dashboard(histogram=activation_histogram(vals_s, bins))))
    return out
