"""What ``sae-eval`` does differently for a cross-layer transcoder (:mod:`sae.models.clt`).

- Rows: every layer's MLP input and output from the held-out shards of the buffer it trained on,
  side by side as in training (:mod:`sae.train.clt_source`), with the token ids of the first layer's
  rows (all layers' rows are the same tokens, in harvest order).
- Per-layer scores: FVU, MSE and cosine of each output layer's reconstruction, and the L0 and dead
  fraction of each layer's latent group; ``fvu_sum`` is the training loss's sum of per-layer FVUs.
- The spliced model: every MLP output replaced by the CLT at once (:func:`sae.eval.splice.clt_splice_eval`):
  the causal CLT as the replacement model (codes from the spliced forward's MLP inputs), the
  acausal crosscoder from the clean forward's MLP inputs.
- Weight views for the report's shared parts: encoder rows [N L, d_enc], the decoder as rows of the
  concatenated layout [N L, D] (zeros where a group does not write), and each latent's direction on
  the residual stream [N L, M] (the sum of what it adds to every MLP output) for the dashboards'
  promoted tokens and neighbours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.buffer.manifest import read_manifest
from sae.buffer.normalize import Normalizer
from sae.harvest.text import load_text_dataset

from .config import EvalConfig
from .data import EvalSet, RowBatch, buffer_rows, first_contexts, splice_batches
from .metrics import ReconstructionStats, SparsityStats
from .splice import clt_splice_eval, resolve_site


def clt_inputs(cfg: EvalConfig, meta: dict[str, Any]):
    """The CLT's eval rows (and, for splicing or examples, the model) as ``sae.eval.run.EvalInputs``.

    Raises:
        ValueError: a source other than the buffer, or a cfg.json without the CLT's layers.
    """
    from .run import EvalInputs, data_config

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
def weight_views(clt: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(encoder rows [N L, d_enc], decoder rows [N L, D], residual-stream directions [N L, M])."""
    dec = clt.dense_decoder()
    return clt.W_enc.flatten(0, 1), dec, dec.view(dec.shape[0], clt.n_layers, clt.d_model).sum(1)
