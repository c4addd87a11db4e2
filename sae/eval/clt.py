"""What ``sae-eval`` does differently for a cross-layer transcoder (:mod:`sae.models.clt`).

- Rows: every layer's MLP input and output from the held-out shards of the buffer it trained on,
  side by side as in training (:mod:`sae.buffer.clt_source`), with the token ids of the first layer's
  rows (all layers' rows are the same tokens, in harvest order), as harvested: the per-layer
  normalisers the CLT trained with are folded into a copy of its weights (:func:`raw_clt`).
- Per-layer scores: FVU, MSE and cosine of each output layer's reconstruction, and the L0 and dead
  fraction of each layer's latent group; ``fvu_sum`` is the training loss's sum of per-layer FVUs.
- The spliced model: every MLP output replaced by the CLT at once (:func:`sae.eval.splice.clt_splice_eval`):
  the causal CLT as the replacement model (codes from the spliced forward's MLP inputs), the
  acausal crosscoder from the clean forward's MLP inputs.
- Weight views for the report's shared parts: encoder rows [N L, d_enc] and each latent's direction
  on the residual stream [N L, M] (the sum of what it adds to every MLP output) for the dashboards'
  promoted tokens and neighbours; decoder norms and the decoder mean max cosine per group, block by
  block, never through the dense [N L, N M] decoder.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.buffer.manifest import read_manifest
from sae.buffer.normalize import Normalizer, per_layer_affines
from sae.harvest.text import load_text_dataset

from .config import EvalConfig
from .data import EvalSet, RowBatch, buffer_rows, first_contexts, splice_batches
from .inputs import EvalInputs, data_config
from .metrics import ReconstructionStats, SparsityStats, sampled_rows
from .splice import clt_splice_eval, resolve_site


def raw_clt(clt: Any, meta: dict[str, Any]) -> Any:
    """``clt`` working on raw rows: a copy with the per-layer normalisers of its cfg.json
    (``normalization.per_layer``) folded into the weights; ``clt`` itself when it trained on raw rows."""
    layers = (meta.get("normalization") or {}).get("per_layer")
    if not layers:
        return clt
    out = copy.deepcopy(clt)
    out.fold_normalization_(*per_layer_affines(layers, clt.d_model))
    return out


def clt_inputs(cfg: EvalConfig, meta: dict[str, Any]):
    """The CLT's eval rows (and, for splicing or examples, the model) as :class:`~sae.eval.inputs.EvalInputs`.

    Raises:
        ValueError: a source other than the buffer, or a cfg.json without the CLT's layers.
    """
    data = data_config(meta, cfg.trust_remote_code)
    if (cfg.source or data.source) != "buffer" or "clt" not in meta:
        raise ValueError(f"eval.source={cfg.source or data.source!r}: a CLT is evaluated on the buffer it was trained "
                         "on, whose layers its cfg.json lists under 'clt' (eval.source=buffer, eval.buffer_path)")
    folder = Path(cfg.buffer_path or data.buffer.path)
    manifest = read_manifest(folder)
    inputs, targets = meta["clt"]["inputs"], meta["clt"]["targets"]
    none = Normalizer("none")
    per_layer = [buffer_rows(folder, i, t, shards=cfg.shards, heldout_shards=data.buffer.heldout_shards,
                             max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, x_norm=none, y_norm=none)
                 for i, t in zip(inputs, targets)]

    def make():
        for parts in zip(*per_layer):
            first = parts[0]
            yield RowBatch(torch.cat([p.x for p in parts], 1), torch.cat([p.y for p in parts], 1), first.token_ids,
                           first.positions, first.contexts)

    info = {**per_layer[0].info, "hookpoint": ", ".join(inputs), "target_hookpoint": ", ".join(targets)}
    inp = EvalInputs(EvalSet(make, "buffer", info), info["hookpoint"], info["target_hookpoint"], none, none)
    stats = manifest["stats"]
    if all(stats.get(t, {}).get("count") for t in targets):  # buffer-wide means of the MLP outputs
        inp.mean = [torch.tensor(stats[t]["sum"], dtype=torch.float64).div(stats[t]["count"]).float()
                    for t in targets]
    inp.attach_buffer_model(cfg, manifest, inputs + targets)
    return inp


@torch.no_grad()
def score_clt_rows(clt: Any, rows: EvalSet, device: torch.device, dead_window_tokens: int = 0
                   ) -> tuple[ReconstructionStats, SparsityStats, list[ReconstructionStats]]:
    """Sums over every eval row: the concatenated layout, and each output layer on its own.

    Raises:
        ValueError: rows of another width, or no rows.
    """
    rec, spa = ReconstructionStats(), SparsityStats(clt.num_latents, dead_window_tokens)
    layers = [ReconstructionStats() for _ in range(clt.n_layers)]
    M = clt.d_model
    clt.eval()
    for b in rows:
        if b.x.shape[1] != clt.d_in or b.y is None or b.y.shape[1] != clt.d_out:
            raise ValueError(f"the eval rows have width {b.x.shape[1]} but the CLT reads {clt.d_in}: evaluate it on "
                             "the buffer it was trained on (eval.buffer_path)")
        x, y = b.x.to(device), b.y.to(device)
        codes = clt.encode(x)
        y_hat = clt.decode(codes)
        rec.update(y_hat, y)
        spa.update(codes)
        for j, stats in enumerate(layers):
            stats.update(y_hat[:, j * M:(j + 1) * M], y[:, j * M:(j + 1) * M])
    if rec.n_tokens == 0:
        raise ValueError(f"no evaluation rows from the buffer ({rows.info}); check eval.shards and the buffer")
    return rec, spa, layers


def per_layer_report(clt: Any, meta: dict[str, Any], layers: list[ReconstructionStats], spa: SparsityStats
                     ) -> dict[str, Any]:
    """report.json's ``clt`` section: the layout and one row per layer."""
    L = clt.latents_per_layer
    fired = spa.fire_counts.view(clt.n_layers, L)
    rows = []
    for j, stats in enumerate(layers):
        rows.append({"layer": meta["clt"]["layers"][j], "input": meta["clt"]["inputs"][j],
                     "target": meta["clt"]["targets"][j], "fvu": stats.fvu, "mse": stats.mse, "cosine": stats.cosine,
                     "l0": float(fired[j].sum()) / max(spa.n_tokens, 1),
                     "dead_fraction": float((fired[j] == 0).float().mean())})
    return {"n_layers": clt.n_layers, "d_model": clt.d_model, "latents_per_layer": L, "activation": clt.activation,
            "acausal": clt.acausal, "fvu_sum": sum(r["fvu"] for r in rows), "layers": rows}


def clt_splice(cfg: EvalConfig, clt: Any, inp: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """The spliced-model section of the report for a CLT (see the module docstring)."""
    if not cfg.splice.enabled:
        return {"skipped": "eval.splice.enabled=false"}
    if inp.lm is None:
        return {"skipped": inp.no_model or "no model"}
    ds = inp.ds if inp.ds is not None else load_text_dataset(inp.text)
    batches = splice_batches(inp.harvester, inp.text, ds, first_contexts(inp.rows, cfg.splice.contexts),
                             cfg.splice.batch_size)
    model = inp.lm.model
    reads = [resolve_site(model, hp) for hp in meta["clt"]["inputs"]]
    writes = [resolve_site(model, hp) for hp in meta["clt"]["targets"]]
    mode = "clean" if clt.acausal else "replacement"
    metrics = clt_splice_eval(model, reads, writes, clt, batches, inp.kind, inp.lm.device, mean=inp.mean,
                              inputs=mode)
    return {"kind": inp.kind, "model": str(inp.lm.info.get("name")), "read": [r.module for r in reads],
            "write": [w.module for w in writes], "inputs": mode, "contexts": sum(b.input_ids.shape[0] for b in batches),
            "metrics": metrics}


@torch.no_grad()
def weight_views(clt: Any) -> tuple[Tensor, Tensor]:
    """(encoder rows [N L, d_enc], residual-stream directions [N L, M]: each latent's decoder rows
    summed over the layers it writes), without the dense [N L, N M] decoder (11 GB for a GPT-2-small
    CLT at 32x, about 100 GB at Gemma-2-2B sizes)."""
    return clt.W_enc.flatten(0, 1), torch.cat([w.detach().sum(1) for w in clt.W_dec])


@torch.no_grad()
def decoder_norms(clt: Any) -> Tensor:
    """[N L] norm of each latent's whole decoder vector (every layer it writes), on the CPU."""
    return torch.cat([w.detach().float().pow(2).sum((1, 2)).sqrt() for w in clt.W_dec]).cpu()


@torch.no_grad()
def decoder_mean_max_cosine(clt: Any, sample: int = 0, seed: int = 0, chunk: int = 512) -> float:
    """:func:`sae.eval.metrics.mean_max_cosine` of the CLT's decoder vectors (each latent's rows for
    every layer it writes, zero elsewhere), computed block by block: the dot product of latents of
    groups i and j sums ``W_dec[i][a, l] . W_dec[j][b, l]`` over the output layers both write."""
    n, L = clt.n_layers, clt.W_dec[0].shape[0]
    total = n * L
    if total < 2:
        return float("nan")
    W = [w.detach().float() for w in clt.W_dec]  # [L, n - first_out(i), M]
    norms = [w.pow(2).sum((1, 2)).sqrt().clamp_min(1e-12) for w in W]
    rows = sampled_rows(total, sample, seed)
    best = []
    for i in range(n):
        mine = rows[(rows >= i * L) & (rows < (i + 1) * L)] - i * L
        for start in range(0, mine.numel(), chunk):
            r = mine[start:start + chunk].to(W[i].device)
            A = W[i][r]  # [r, n - first_out(i), M]
            top = torch.full((r.numel(),), -2.0, device=A.device)
            for j in range(n):
                lo = max(clt.first_out(i), clt.first_out(j))
                dots = sum(A[:, out - clt.first_out(i)] @ W[j][:, out - clt.first_out(j)].T for out in range(lo, n))
                cos = dots / (norms[i][r][:, None] * norms[j][None, :])
                if j == i:
                    cos[torch.arange(r.numel(), device=cos.device), r] = -2.0  # not the latent itself
                top = torch.maximum(top, cos.max(dim=1).values)
            best.append(top)
    return float(torch.cat(best).double().mean())
