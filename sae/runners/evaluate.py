"""Run a full evaluation of one SAE folder: what ``sae-eval`` calls (and the training summary).

Steps: load the SAE and the data section of its cfg.json; open the eval rows (held-out buffer
shards, live held-out contexts, or synthetic held-out batches) and, for real models, the model
with its head; score reconstruction and sparsity over all rows; splice the SAE into the model;
collect top-activating contexts; write ``report.json``, ``latents.safetensors`` (per-latent
frequency, firing count, decoder norm), PNG plots and ``report.html`` into the output folder.
A cross-layer transcoder (architecture ``clt``) reads every layer's MLP rows, adds per-layer scores
and splices into every MLP at once (:mod:`sae.eval.clt`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae.buffer.atomic import write_json_atomic
from sae.eval import plots
from sae.eval.config import EvalConfig, validate_eval
from sae.eval.dashboards import add_panels, unembedding
from sae.eval.data import (
    EvalSet,
    first_contexts,
    splice_batches,
)
from sae.eval.examples import pick_latents, top_examples
from sae.eval.inputs import EvalInputs, open_inputs
from sae.eval.lm import SAEReconstructor
from sae.eval.metrics import ReconstructionStats, SparsityStats, mean_max_cosine
from sae.eval.report import check_report_dir, examples_json, package_versions, render_html
from sae.eval.splice import resolve_site, splice_eval
from sae.harvest.model import resolve_device
from sae.harvest.text import load_text_dataset
from sae.models import SparseCoder, sae_class
from sae.paths import replacing_dir
from sae.train.artifact import CFG, load_sae, read_sae_cfg, save_weights

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    out_dir: Path
    report: dict[str, Any]
    """Everything in report.json."""
    report_json: Path
    report_html: Path | None


SHARDS = "shard_*_of_*"


def _is_sae_dir(d: Path) -> bool:
    """A portable SAE folder, or a latent-parallel one (``shard_RR_of_WW`` folders, each an SAE)."""
    return (d / CFG).is_file() or any((s / CFG).is_file() for s in d.glob(SHARDS))


def find_sae_dir(path: str | Path) -> Path:
    """The SAE folder at ``path``, or the only one inside it (run dir, final/, checkpoint).

    Raises:
        FileNotFoundError: no SAE there. ValueError: several SAEs; the message lists them.
    """
    p = Path(path)
    if _is_sae_dir(p):
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"eval.sae_path={str(path)!r} does not exist; give a final/<name>/ or a checkpoint "
                                "folder")
    found = sorted(d for pattern in ("*", "final/*") for d in p.glob(pattern) if d.is_dir() and _is_sae_dir(d))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"no SAE ({CFG}) in {p} or its final/ folder; point eval.sae_path at final/<name>/")
    raise ValueError(f"{p} holds {len(found)} SAEs ({', '.join(str(f) for f in found[:6])}); choose one with "
                     "eval.sae_path")


def load_for_eval(sae_dir: Path, device: torch.device) -> tuple[SparseCoder, dict[str, Any]]:
    """The SAE (latent-parallel shards joined) and its cfg.json metadata."""
    if (sae_dir / CFG).is_file():
        return load_sae(sae_dir, device), read_sae_cfg(sae_dir)
    from sae.train.shards import consolidate_sae, shard_folders

    return consolidate_sae(sae_dir).to(device), read_sae_cfg(shard_folders(sae_dir)[0])


@torch.no_grad()
def score_rows(sae: SparseCoder, rows: EvalSet, device: torch.device, dead_window_tokens: int = 0
               ) -> tuple[ReconstructionStats, SparsityStats]:
    """Reconstruction and sparsity sums over every eval row (one pass, bounded memory).

    Raises:
        ValueError: no rows.
    """
    rec, spa = ReconstructionStats(), SparsityStats(sae.num_latents, dead_window_tokens)
    was_training = sae.training
    sae.eval()
    try:
        for b in rows:
            if b.x.shape[1] != sae.d_in or (b.y is not None and b.y.shape[1] != sae.d_out):
                got = (b.x.shape[1], b.x.shape[1] if b.y is None else b.y.shape[1])
                where = f" at hook point {rows.info['hookpoint']!r}" if rows.info.get("hookpoint") else ""
                raise ValueError(f"the {rows.source} rows{where} have d_in, d_out = {got} but the SAE has "
                                 f"{(sae.d_in, sae.d_out)}; evaluate it on the data it was trained on (eval.source, "
                                 "eval.buffer_path)")
            x = b.x.to(device)
            codes = sae.encode(x)
            rec.update(sae.reconstruct(x, codes), b.y.to(device) if b.y is not None else x)
            spa.update(codes)
    finally:
        sae.train(was_training)
    if rec.n_tokens == 0:
        raise ValueError(f"no evaluation rows from the {rows.source} source ({rows.info}); check eval.shards and "
                         "the buffer")
    return rec, spa


def _splice(cfg: EvalConfig, sae: SparseCoder, inp: EvalInputs) -> dict[str, Any]:
    if not cfg.splice.enabled:
        return {"skipped": "eval.splice.enabled=false"}
    if inp.lm is None:
        return {"skipped": inp.no_model}
    ds = inp.ds if inp.ds is not None else load_text_dataset(inp.text)
    batches = splice_batches(inp.harvester, inp.text, ds, first_contexts(inp.rows, cfg.splice.contexts),
                             cfg.splice.batch_size)
    model = inp.lm.model
    read = resolve_site(model, inp.hookpoint)
    write = resolve_site(model, inp.target_hookpoint or inp.hookpoint)
    metrics = splice_eval(model, read, write, SAEReconstructor(sae, inp.x_norm, inp.y_norm), batches, inp.kind,
                          inp.lm.device, mean=inp.mean)
    return {"kind": inp.kind, "model": str(inp.lm.info.get("name")), "read": read.module, "write": write.module,
            "contexts": sum(b.input_ids.shape[0] for b in batches), "metrics": metrics}


def _find_metrics_log(sae_dir: Path) -> Path | None:
    for parent in list(sae_dir.resolve().parents)[:3]:
        if (parent / "metrics.jsonl").is_file():
            return parent / "metrics.jsonl"
    return None


def _write_plots(out: Path, sae_dir: Path, spa: SparsityStats, norms: torch.Tensor, metrics: dict[str, float]
                 ) -> dict[str, Path]:
    made = {
        "feature density": plots.plot_density(spa.density_histogram(), out / "density.png"),
        "L0 distribution": plots.plot_l0(spa.l0_counts, out / "l0.png", metrics["l0"]),
        "frequency vs decoder norm": plots.plot_freq_vs_norm(spa.frequencies, norms, out / "freq_vs_norm.png",
                                                             spa.n_tokens),
    }
    log_path = _find_metrics_log(sae_dir)
    if log_path is not None:
        curves = plots.read_curves(log_path, sae_dir.name)
        path = plots.plot_training(curves, out / "training.png")
        if path is not None:
            made["training curves"] = path
    return made


FINITE_METRICS = ("fvu", "mse", "cosine", "l0", "l1")
"""Metrics every working SAE has finite (others, such as a ratio over an empty set, may be NaN)."""


def check_finite_metrics(metrics: dict[str, float], norms: torch.Tensor, sae: SparseCoder) -> None:
    """Refuse to report an SAE whose core metrics or decoder norms are NaN/Inf.

    Raises:
        ValueError: naming the non-finite metrics and the likely cause (weights that hold NaN/Inf,
            or an encoder/reconstruction that overflows).
    """
    bad = [f"{k}={metrics[k]}" for k in FINITE_METRICS if k in metrics and not math.isfinite(metrics[k])]
    if n := int((~torch.isfinite(norms)).sum()):
        bad.append(f"decoder norms of {n} latents")
    if not bad:
        return
    damaged = [name for name, t in sae.named_parameters() if not torch.isfinite(t).all()]
    cause = (f"the SAE's {', '.join(damaged)} hold NaN/Inf; evaluate an undamaged checkpoint or retrain" if damaged
             else "its weights are finite, so its encoder or reconstruction overflows float32 on these rows, or the "
                  "rows hold NaN/Inf; check the SAE's scale and the eval data (eval.source, eval.buffer_path)")
    raise ValueError(f"non-finite metrics on the eval rows ({', '.join(bad)}): {cause}")


def _write_report(out: Path, cfg: EvalConfig, sae_dir: Path, report: dict[str, Any], spa: SparsityStats,
                  norms: torch.Tensor, examples: list) -> None:
    """latents.safetensors, the plots, report.json and report.html into ``out``."""
    save_weights({"frequency": spa.frequencies.float(), "fire_counts": spa.fire_counts.float(),
                  "decoder_norm": norms.contiguous()}, str(out / "latents.safetensors"))
    made = _write_plots(out, sae_dir, spa, norms, report["metrics"]) if cfg.plots else {}
    report["plots"] = {name: p.name for name, p in made.items()}
    write_json_atomic(out / "report.json", _finite(report))
    if cfg.html:
        (out / "report.html").write_text(render_html(report, made, examples), encoding="utf-8")


def run_eval(cfg: EvalConfig) -> EvalResult:
    """Evaluate the SAE at ``cfg.sae_path`` and write the report (see the module docstring).

    Everything is checked and computed before the report folder is touched; the report is written
    into a temporary sibling and renamed into place, so a failure leaves an earlier report as it was.

    Raises:
        ValueError / FileNotFoundError: bad config, no SAE, missing data, a folder that is not a
            report's, non-finite metrics; messages name the fix.
    """
    validate_eval(cfg)
    sae_dir = find_sae_dir(cfg.sae_path)
    out = Path(cfg.out_dir) if cfg.out_dir else sae_dir / "eval"
    check_report_dir(out)
    device = resolve_device(cfg.device)
    sae, meta = load_for_eval(sae_dir, device)
    sae.eval()
    is_clt = sae_class(meta["architecture"]).cross_layer  # every layer's MLP at once: sae.eval.clt
    if is_clt:
        from sae.eval import clt

        inp = clt.clt_inputs(cfg, meta)
        sae = clt.raw_clt(sae, meta)
        rec, spa, layer_stats = clt.score_clt_rows(sae, inp.rows, device, cfg.dead_window_tokens)
        W_enc, directions = clt.weight_views(sae)
    else:
        inp = open_inputs(cfg, meta)
        rec, spa = score_rows(sae, inp.rows, device, cfg.dead_window_tokens)
        W_enc, directions = sae.W_enc, sae.W_dec
    metrics = {**rec.as_dict(), **spa.as_dict(cfg.dense_threshold), "tokens": float(rec.n_tokens)}
    n = cfg.feature_stats_latents
    metrics["encoder_mean_max_cosine"] = mean_max_cosine(W_enc, n)
    metrics["decoder_mean_max_cosine"] = clt.decoder_mean_max_cosine(sae, n) if is_clt else \
        mean_max_cosine(sae.W_dec, n)
    norms = clt.decoder_norms(sae) if is_clt else plots.decoder_norms(sae.W_dec)
    check_finite_metrics(metrics, norms, sae)
    if inp.rows.source == "synthetic":
        from sae.buffer.synthetic import feature_recovery

        metrics["feature_recovery"] = feature_recovery(inp.rows.info["features"], sae.W_dec.cpu()).item()
    splice = clt.clt_splice(cfg, sae, inp, meta) if is_clt else _splice(cfg, sae, inp)
    examples, examples_skipped, tokens_skipped = [], "", ""
    if inp.lm is None:
        examples_skipped = inp.no_model
    elif cfg.examples.num_latents > 0:
        ex = cfg.examples
        latents = pick_latents(spa.frequencies, ex.num_latents, ex.seed)
        examples = top_examples(sae, inp.rows, latents, inp.lm.tokenizer, per_latent=ex.per_latent,
                                before=ex.before, after=ex.after, device=device, bins=ex.histogram_bins)
        W_U = unembedding(inp.lm.model) if inp.kind == "causal_lm" else None
        tokens_skipped = add_panels([le.dashboard for le in examples], directions, [le.latent for le in examples],
                                    neighbours=ex.neighbours, tokens=ex.logit_tokens, W_U=W_U,
                                    out_scale=inp.y_norm.scale if inp.y_norm.mode != "none" else 1.0,
                                    tokenizer=inp.lm.tokenizer)
    hist = spa.density_histogram()
    report: dict[str, Any] = {
        "sae": {"name": sae_dir.name, "path": str(sae_dir), "architecture": meta["architecture"],
                "d_in": sae.d_in, "d_out": sae.d_out, "num_latents": sae.num_latents, "k": sae.cfg.k,
                "transcoder": bool(sae.cfg.transcode), "hookpoint": inp.hookpoint,
                "target_hookpoint": inp.target_hookpoint},
        "data": {"source": inp.rows.source, **{k: v for k, v in inp.rows.info.items() if k != "features"},
                 "normalization": {"x": inp.x_norm.mode, "y": inp.y_norm.mode}},
        "metrics": metrics,
        "splice": splice,
        "density_histogram": dataclasses.asdict(hist),
        "l0_histogram": spa.l0_counts[: int(spa.l0_counts.nonzero().max()) + 1].long().tolist(),
        "examples": examples_json(examples),
        "config": dataclasses.asdict(cfg),
        "versions": package_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if is_clt:
        report["clt"] = clt.per_layer_report(sae, meta, layer_stats, spa)
        metrics["fvu_sum"] = report["clt"]["fvu_sum"]
    if examples_skipped:
        report["examples_skipped"] = examples_skipped
    if tokens_skipped:
        report["logit_tokens_skipped"] = tokens_skipped
    with replacing_dir(out, "report") as staging:
        _write_report(staging, cfg, sae_dir, report, spa, norms, examples)
    return EvalResult(out, report, out / "report.json", out / "report.html" if cfg.html else None)


def _finite(obj: Any) -> Any:
    """NaN/Inf -> None so report.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def splice_figure(report: dict[str, Any]) -> str:
    """The headline spliced-model number, as text ("n/a (...)" when there is none)."""
    sp = report.get("splice") or {}
    m = sp.get("metrics")
    if not m:
        return f"spliced: n/a ({sp.get('skipped', 'not run')})"
    if sp["kind"] == "causal_lm":
        return (f"CE recovered={m['ce_loss_recovered']:.3f} (CE {m['ce_loss_clean']:.3f} -> {m['ce_loss_sae']:.3f}, "
                f"KL={m['kl_div_sae']:.3g})")
    return f"embedding cos={m['pooled_cosine_sae']:.4f} last-hidden FVU={m['hidden_fvu_sae']:.4f}"


def summary_line(result: EvalResult) -> str:
    """One line for a CLI's final print: FVU, L0, dead %, the spliced-model figure, the report."""
    m = result.report["metrics"]
    where = result.report_html or result.report_json
    return (f"fvu={m['fvu']:.4f} l0={m['l0']:.1f} dead={100 * m['dead_fraction']:.1f}% {splice_figure(result.report)}"
            f"  report: {where}")
