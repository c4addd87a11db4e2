"""A model's transcoders as one replacement of every MLP: what circuit-tracer traces, scored here.

Two kinds of replacement, one interface (``n_layers``, ``encode_layer(i, x)``, ``decode_layer(j,
codes)``, as :class:`sae.models.clt.CrossLayerTranscoder` has it):

- a cross-layer transcoder: itself (layer j's MLP output from the codes of layers 0..j);
- per-layer transcoders, one per MLP (:class:`TranscoderSet`): layer j's MLP output from layer j's
  own codes and, for skip transcoders, its input's linear path.

Both are given in the model's raw activation space (as circuit-tracer reads them: an imported
circuit-tracer folder, normalisation folded in). :func:`evaluate_replacement` reports, on the
same contexts:

- per layer, the reconstruction of that MLP's output from the clean forward's MLP inputs (FVU,
  cosine, relative norm) and that layer's latents' L0 and dead fraction on those tokens;
- the replacement model (every MLP replaced at once, codes read from the spliced forward's own MLP
  inputs, so errors of early layers reach later ones, as in circuit-tracer's replacement model):
  CE loss recovered and KL to the clean model, by :func:`sae.eval.splice.clt_splice_eval`.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from sae.harvest.harvester import Harvester
from sae.harvest.text import iter_batches, iter_contexts
from sae.models import SparseCoder

from .metrics import ReconstructionStats, SparsityStats
from .splice import SpliceBatch, clt_splice_eval, resolve_site


class TranscoderSet(nn.Module):
    """Per-layer transcoders in the replacement interface; codes carry their layer's input for the
    skip path."""

    acausal = False

    def __init__(self, transcoders: list[SparseCoder]):
        super().__init__()
        if not transcoders:
            raise ValueError("no transcoders given")
        self.transcoders = nn.ModuleList(transcoders)
        self.n_layers = len(transcoders)
        self.latents_per_layer = transcoders[0].num_latents

    @torch.no_grad()
    def encode_layer(self, i: int, x: Tensor, *, sparse: bool = False) -> tuple[Tensor, Any]:
        return x, self.transcoders[i].encode(x)

    @torch.no_grad()
    def decode_layer(self, j: int, codes: list[Any]) -> Tensor:
        x, c = codes[j]
        return self.transcoders[j].reconstruct(x, c)

    @staticmethod
    def layer_codes(codes: Any) -> Any:
        return codes[1]


def _layer_codes(replacement: Any, codes: Any) -> Any:
    return replacement.layer_codes(codes) if hasattr(replacement, "layer_codes") else codes


def eval_contexts(harvester: Harvester, ds: Any, first: int, n: int, batch_size: int) -> list[SpliceBatch]:
    """Contexts ``[first, first + n)`` of the text as forward batches, with the rows the harvester
    keeps marked (the tokens every score below is taken on)."""
    ctxs = list(islice(iter_contexts(ds, harvester.lm.tokenizer, harvester.text), first, first + n))
    if len(ctxs) < n:
        raise ValueError(f"the text has {first + len(ctxs)} contexts, fewer than the {first + n} asked for "
                         f"(contexts {first}..{first + n - 1}); lower the first context or the count")
    return [SpliceBatch(b.input_ids, b.attention_mask, harvester.keep_mask(b))
            for b in iter_batches(ctxs, batch_size, harvester.pad_id)]


@torch.no_grad()
def layer_scores(replacement: Any, harvester: Harvester, batches: list[SpliceBatch], reads: list[str],
                 writes: list[str], device: torch.device) -> list[dict[str, float]]:
    """Per layer: FVU, cosine, relative norm of the MLP output reconstructed from the clean forward's
    MLP inputs, and L0 / dead fraction of that layer's latents, over the kept rows of ``batches``."""
    n = replacement.n_layers
    rec = [ReconstructionStats() for _ in range(n)]
    spa = [SparsityStats(replacement.latents_per_layer) for _ in range(n)]
    for b in batches:
        acts = harvester.capture(b.input_ids.to(harvester.lm.device), b.attention_mask.to(harvester.lm.device))
        keep = b.keep.to(device)
        xs = [acts[r][keep].float().to(device) for r in reads]
        codes = [replacement.encode_layer(i, x, sparse=True) for i, x in enumerate(xs)]
        for j in range(n):
            y = acts[writes[j]][keep].float().to(device)
            rec[j].update(replacement.decode_layer(j, codes), y)
            spa[j].update(_layer_codes(replacement, codes[j]))
    out = []
    for j in range(n):
        r, s = rec[j].as_dict(), spa[j].as_dict(0.1)
        out.append({"layer": j, "fvu": r["fvu"], "cosine": r["cosine"], "relative_norm": r["relative_norm"],
                    "l0": s["l0"], "dead_fraction": s["dead_fraction"], "tokens": float(rec[j].n_tokens)})
    return out


def evaluate_replacement(replacement: Any, model: nn.Module, harvester: Harvester, batches: list[SpliceBatch],
                         reads: list[str], writes: list[str], device: torch.device) -> dict[str, Any]:
    """Per-layer scores and the replacement model's CE / KL (see the module docstring).

    ``model``: the causal LM with its head; ``harvester`` captures every hook point of ``reads`` and
    ``writes`` (layer i's MLP input and output) on it (or on its body, sharing the weights).
    """
    if len(reads) != replacement.n_layers or len(writes) != replacement.n_layers:
        raise ValueError(f"{len(reads)} MLP inputs and {len(writes)} outputs for {replacement.n_layers} layers")
    layers = layer_scores(replacement, harvester, batches, reads, writes, device)
    sites_in = [resolve_site(model, hp) for hp in reads]
    sites_out = [resolve_site(model, hp) for hp in writes]
    splice = clt_splice_eval(model, sites_in, sites_out, replacement, batches, "causal_lm", device,
                             inputs="replacement")
    tokens = sum(float(b.keep.sum()) for b in batches)
    mean = {k: sum(r[k] for r in layers) / len(layers) for k in ("fvu", "l0", "dead_fraction")}
    return {"layers": layers, "mean": mean, "splice": splice, "contexts": sum(b.input_ids.shape[0] for b in batches),
            "tokens": tokens}
