"""``sae-eval`` of a model's transcoders as one replacement (a circuit-tracer folder).

``sae-eval sae_path=<folder written by sae-export --format circuit-tracer>`` scores the per-layer
transcoders (or the CLT) exactly as circuit-tracer will read them (our importer reads the folder):

1. per layer, FVU / L0 / dead fraction on ``splice.contexts`` contexts of the text from
   ``splice.first_context`` (:func:`sae.eval.replacement.layer_scores`);
2. the replacement model, every MLP replaced at once: CE loss recovered and KL on those contexts;
3. circuit-tracer's graph scores (replacement, completeness) averaged over ``graph.prompts``
   (:mod:`sae.use.graph`, in the peers venv), so that two training recipes compare on the number
   circuit researchers read.

Writes ``report.json`` and ``report.md`` into ``out_dir`` (default ``<folder>/eval``). The folder
layout and the model's depth and width are checked before anything loads; the text is the
built-in corpus (``TextConfig()``, as ``sae-train``'s default), from ``splice.first_context``.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

from sae.buffer.atomic import write_json_atomic
from sae.eval.config import EvalConfig
from sae.eval.lm import load_eval_model
from sae.eval.replacement import TranscoderSet, eval_contexts, evaluate_replacement
from sae.eval.report import check_report_dir, package_versions
from sae.export.circuit_tracer import read_all, read_config
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.harvester import Harvester
from sae.harvest.model import LoadedModel, resolve_device
from sae.harvest.text import load_text_dataset
from sae.paths import replacing_dir
from sae.use.graph import GraphSettings, check_model, check_transcoders, format_scores, trace


def is_replacement_folder(path: str | Path) -> bool:
    """A circuit-tracer folder (config.yaml with a model_kind) rather than one SAE's."""
    p = Path(path)
    return p.is_dir() and (p / "config.yaml").is_file() and read_config(p) is not None


def run_replacement_eval(cfg: EvalConfig, model: str = "") -> tuple[Path, dict[str, Any]]:
    """Score the transcoders of the circuit-tracer folder ``cfg.sae_path`` (see the module docstring);
    returns (report folder, report)."""
    folder = check_transcoders(cfg.sae_path)
    name = model or folder.model_name
    if not name:
        raise ValueError(f"{folder.path}/config.yaml names no model: export the transcoders with --model-name")
    check_model(name, folder)  # depth and width, before anything loads
    out = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.sae_path) / "eval"
    check_report_dir(out)
    device = resolve_device(cfg.device)
    coders = read_all(folder.path)
    replacement = coders[0].sae if folder.kind == "cross_layer_transcoder" else TranscoderSet([c.sae for c in coders])
    replacement.to(device).eval()
    lm, kind = load_eval_model(ModelConfig(name=name, device=str(device)))
    if kind != "causal_lm":
        raise ValueError(f"model {name!r} is not a causal LM: the replacement model is scored by next-token CE")
    reads = [f"layers.{i}.mlp_in" for i in range(folder.n_layers)]
    writes = [f"layers.{i}.mlp" for i in range(folder.n_layers)]
    text = TextConfig()
    body = LoadedModel(lm.model.base_model, lm.tokenizer, lm.device, lm.info)
    harvester = Harvester(body, reads + writes, text, HarvestConfig(progress=False))
    batches = eval_contexts(harvester, load_text_dataset(text), cfg.splice.first_context, cfg.splice.contexts,
                            cfg.splice.batch_size)
    scores = evaluate_replacement(replacement, lm.model, harvester, batches, reads, writes, device)
    graph: dict[str, Any] = {"skipped": "eval.graph.enabled=false"}
    if cfg.graph.enabled:
        g = cfg.graph
        graph = trace(folder.path, GraphSettings(prompts=list(g.prompts), max_feature_nodes=g.max_feature_nodes,
                                                 batch_size=g.batch_size), model=name)
    m = scores["splice"]
    report = {"kind": folder.kind, "transcoders": str(folder.path), "model": name, "n_layers": folder.n_layers,
              "d_transcoder": folder.d_transcoder, "text": dataclasses.asdict(text),
              "contexts": {"first": cfg.splice.first_context, "count": scores["contexts"], "tokens": scores["tokens"]},
              "metrics": {**scores["mean"], "ce_loss_recovered": m["ce_loss_recovered"], "kl_div": m["kl_div_sae"],
                          **({"graph_replacement_score": graph["mean"]["replacement_score"],
                              "graph_completeness_score": graph["mean"]["completeness_score"]}
                             if "mean" in graph else {})},
              "layers": scores["layers"], "splice": {"kind": "causal_lm", "inputs": "replacement", "metrics": m},
              "graph": graph, "config": dataclasses.asdict(cfg), "versions": package_versions(),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with replacing_dir(out, "report") as tmp:
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.md").write_text(report_markdown(report))
    return out, report


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the headline figures, the per-layer table and the graph table."""
    m, sp = report["metrics"], report["splice"]["metrics"]
    lines = [f"# {report['kind']}: {report['transcoders']}", "",
             f"Model {report['model']}, {report['n_layers']} layers x {report['d_transcoder']} latents; "
             f"{report['contexts']['count']} contexts from context {report['contexts']['first']} "
             f"({report['contexts']['tokens']:.0f} tokens).", "",
             "| mean FVU | mean L0 | mean dead | CE clean | CE replaced | CE recovered | KL | graph replacement | "
             "graph completeness |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {m['fvu']:.4f} | {m['l0']:.1f} | {100 * m['dead_fraction']:.1f}% | {sp['ce_loss_clean']:.3f} | "
             f"{sp['ce_loss_sae']:.3f} | {m['ce_loss_recovered']:.4f} | {m['kl_div']:.3f} | "
             f"{m.get('graph_replacement_score', float('nan')):.4f} | "
             f"{m.get('graph_completeness_score', float('nan')):.4f} |", "",
             "| layer | FVU | cosine | L0 | dead |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['fvu']:.4f} | {r['cosine']:.3f} | {r['l0']:.1f} | {100 * r['dead_fraction']:.1f}% |"
              for r in report["layers"]]
    if "prompts" in report["graph"]:
        lines += ["", format_scores(report["graph"])]
    return "\n".join(lines) + "\n"


def summary(report: dict[str, Any]) -> str:
    m = report["metrics"]
    graph = (f" graph replacement={m['graph_replacement_score']:.4f} completeness="
             f"{m['graph_completeness_score']:.4f} ({len(report['graph']['prompts'])} prompts)"
             if "graph_replacement_score" in m else "")
    return (f"{report['n_layers']} layers: mean fvu={m['fvu']:.4f} l0={m['l0']:.1f} "
            f"dead={100 * m['dead_fraction']:.1f}% replacement model CE recovered={m['ce_loss_recovered']:.3f} "
            f"KL={m['kl_div']:.3f}{graph}")
