"""Latent dashboards: what the report shows next to each sampled latent's top contexts.

* **Activation histogram**: the latent's non-zero activations over the eval rows, in equal-width
  bins from the smallest to the largest.
* **Promoted and suppressed tokens** (causal LMs): the latent's decoder direction read through the
  unembedding, ``W_U @ W_dec[latent]``, the direct path to the logits (as Neuronpedia's logit
  panels; the final norm's per-position scale is left out, so these are directions, not exact
  logit changes). The direction is taken in the model's own activation space (the SAE's output
  normaliser undone), so a value is the logit change per unit of the latent's activation.
* **Nearest decoder neighbours**: the latents whose decoder rows have the highest cosine with the
  latent's own (itself excluded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

_CHUNK = 65536  # decoder rows per cosine block (bounds the [rows, S] product)


@dataclass
class Histogram:
    edges: list[float]
    """``bins + 1`` bin edges; the last bin is closed on the right."""
    counts: list[int]


@dataclass
class TokenEffect:
    token: str
    token_id: int
    value: float
    """Logit change per unit activation along the direct path."""


@dataclass
class Neighbour:
    latent: int
    cosine: float


@dataclass
class Dashboard:
    histogram: Histogram | None = None
    promoted: list[TokenEffect] = field(default_factory=list)
    suppressed: list[TokenEffect] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)


def activation_histogram(values: Tensor, bins: int) -> Histogram | None:
    """Equal-width histogram of ``values`` (1-D) from their min to their max; None when empty.

    A bin holds ``edges[i] <= v < edges[i + 1]``; the last also holds the maximum. When every value
    is equal there is one bin.
    """
    v = values.detach().flatten().double().cpu()
    if v.numel() == 0:
        return None
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        return Histogram([lo, hi], [int(v.numel())])
    idx = ((v - lo) / (hi - lo) * bins).floor().long().clamp_(0, bins - 1)
    counts = torch.bincount(idx, minlength=bins)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return Histogram(edges.tolist(), counts.tolist())


def decoder_neighbours(W_dec: Tensor, latents: list[int], k: int) -> list[list[Neighbour]]:
    """For each of ``latents``, the ``k`` other latents with the highest decoder-row cosine.

    Rows of zero norm have cosine 0 with everything. Memory: one ``[65536, len(latents)]`` block.
    """
    if not latents or k <= 0:
        return [[] for _ in latents]
    W = W_dec.detach().float()
    q = torch.nn.functional.normalize(W[torch.tensor(latents, device=W.device)], dim=1)  # [S, d]
    best_v, best_i = [], []
    for start in range(0, W.shape[0], _CHUNK):
        block = torch.nn.functional.normalize(W[start:start + _CHUNK], dim=1)
        cos = (block @ q.T).T  # [S, rows]
        own = torch.tensor(latents, device=W.device) - start
        inside = (own >= 0) & (own < block.shape[0])
        cos[inside.nonzero().flatten(), own[inside]] = -float("inf")
        v, i = cos.topk(min(k, cos.shape[1]), dim=1)
        best_v.append(v), best_i.append(i + start)
    v, i = torch.cat(best_v, 1), torch.cat(best_i, 1)
    top_v, pos = v.topk(min(k, v.shape[1], W.shape[0] - 1), dim=1)
    top_i = i.gather(1, pos)
    return [[Neighbour(int(a), float(c)) for a, c in zip(ii.tolist(), vv.tolist())]
            for ii, vv in zip(top_i, top_v)]


def logit_effects(directions: Tensor, W_U: Tensor, k: int, tokenizer: Any = None
                  ) -> list[tuple[list[TokenEffect], list[TokenEffect]]]:
    """For each row of ``directions`` [S, d]: the ``k`` tokens of ``W_U`` [V, d] with the largest
    and the ``k`` with the smallest ``W_U @ direction`` (promoted, suppressed), strongest first.

    Raises:
        ValueError: ``d`` differs between the directions and the unembedding.
    """
    if directions.shape[1] != W_U.shape[1]:
        raise ValueError(f"decoder directions have d={directions.shape[1]} but the unembedding takes "
                         f"d={W_U.shape[1]}")
    dirs = directions.detach().float().to(W_U.device)
    # [S, V] in fp32, the unembedding converted a block at a time (a bf16 W_U is not copied whole).
    logits = torch.cat([dirs @ W_U[i:i + _CHUNK].detach().float().T for i in range(0, W_U.shape[0], _CHUNK)], 1)
    k = min(k, logits.shape[1])
    up_v, up_i = logits.topk(k, dim=1)
    down_v, down_i = logits.topk(k, dim=1, largest=False)

    def effects(ids: Tensor, vals: Tensor) -> list[TokenEffect]:
        ids_l = ids.tolist()
        names = _token_names(tokenizer, ids_l)
        return [TokenEffect(n, i, float(v)) for n, i, v in zip(names, ids_l, vals.tolist())]

    return [(effects(ui, uv), effects(di, dv)) for ui, uv, di, dv in zip(up_i, up_v, down_i, down_v)]


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token as it reads in running text: WordPiece pieces glued (``##``), others spaced as
    the tokenizer's own decoder does (byte-level BPE keeps its leading spaces)."""
    toks = tokenizer.convert_ids_to_tokens(ids)
    wordpiece = type(getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)).__name__ == "WordPiece"
    out = []
    for t in toks:
        if wordpiece:
            out.append(t[2:] if t.startswith("##") else " " + t)
        else:
            out.append(tokenizer.convert_tokens_to_string([t]))
    return out


def _token_names(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    # A byte-level token that is part of a multi-byte character decodes to U+FFFD: show its raw form.
    raw = tokenizer.convert_ids_to_tokens(ids)
    return [r if "\ufffd" in t else t for t, r in zip(token_strings(tokenizer, ids), raw)]


def unembedding(model: Any) -> Tensor | None:
    """The ``[V, d]`` output embedding of a Hugging Face model with an LM head, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    w = getattr(head, "weight", None)
    return w if isinstance(w, Tensor) and w.dim() == 2 else None


def add_panels(boards: list[Dashboard], W_dec: Tensor, latents: list[int], *, neighbours: int, tokens: int,
               W_U: Tensor | None = None, out_scale: float = 1.0, tokenizer: Any = None) -> str:
    """Fill the neighbour and token panels of ``boards`` (one per latent, in place); returns why the
    token panels are missing ("" when filled).

    ``out_scale`` is the SAE's output normaliser scale: decoder directions are divided by it, to
    read them in the model's activation space.
    """
    for b, nb in zip(boards, decoder_neighbours(W_dec, latents, neighbours)):
        b.neighbours = nb
    if not latents or tokens <= 0:
        return ""
    if W_U is None:
        return "the model has no unembedding (not a causal LM)"
    directions = W_dec.detach()[torch.tensor(latents, device=W_dec.device)].float() / out_scale
    try:
        effects = logit_effects(directions, W_U, tokens, tokenizer)
    except ValueError as e:
        return f"{e} (a transcoder writing elsewhere than the residual stream, or another model)"
    for b, (up, down) in zip(boards, effects):
        b.promoted, b.suppressed = up, down
    return ""
