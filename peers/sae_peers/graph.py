"""Attribution graphs by circuit-tracer (0.5.0, unmodified) over a transcoder folder sae-forge exported.

Runs inside .venv-peers (launch/peers_env.sh; circuit-tracer pins transformers 4.57): never imports
sae-forge. Usage: ``python -P -m sae_peers.graph JOB.json``; sae-forge's :mod:`sae.use.graph`
writes the job and reads the result. The job (JSON)::

    model          Hugging Face folder of the model (as sae-forge caches it; transformers 5.x layout)
    view_dir       where to write the transformers-4.x view of it (config and tokenizer files
                   rewritten, weights linked), reused when present
    transcoders    circuit-tracer folder (``sae-export --format circuit-tracer``), absolute path
    prompts        texts; one graph each
    max_feature_nodes, batch_size, max_n_logits, desired_logit_prob: passed to ``attribute``
    graphs_dir     optional: save each graph there (``Graph.to_pt``: graph_<i>.pt)
    out            result JSON: per prompt its replacement and completeness scores
                   (circuit-tracer's ``compute_graph_scores``), active features, seconds

The TransformerLens backend is used: circuit-tracer's nnsight backend fails with the nnsight that
its own pins resolve to (0.8.1: ``No module named 'nnsight.intervention.tracing'``). SmolLM2 is not
one of TransformerLens' named models, so the HookedTransformer is built from the folder's config
(``get_pretrained_model_config``) with the weights converted from the loaded HF model, and two
fixes: TransformerLens ignores the config's ``rope_theta`` (SmolLM2: 100000, read as 10000 — the
logits then differ by up to 2.3 and every graph is silently wrong), so ``rotary_base`` is set from
it; and circuit-tracer wraps each MLP and the unembedding (``mlp.old_mlp``, ``unembed.old_unembed``),
so the state dict's keys are renamed. Before any graph, the replacement model's logits (its
transcoders bypassed, as circuit-tracer's forward does) are compared with the HF model's on the
first prompt; a difference above 1e-3 stops the job.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

CPU = torch.device("cpu")
#: The largest |logit| difference between the HookedTransformer and the HF model accepted.
LOGIT_TOLERANCE = 1e-3


class JobError(Exception):
    """A problem with the job's inputs; the message names it and the fix."""


def transformers4_view(model: Path, view: Path) -> Path:
    """A folder transformers 4.57 reads: ``model``'s config with ``rope_theta`` at the top level,
    its tokenizer config naming the fast tokenizer class, the weights and tokenizer linked."""
    if (view / "config.json").is_file():
        return view
    cfg = json.loads((model / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok.setdefault("model_input_names", ["input_ids", "attention_mask"])
    tmp = view.with_name(f".{view.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    for f in model.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json"):
            os.symlink(f.resolve(), tmp / f.name)
    try:
        os.rename(tmp, view)
    except OSError:  # another job wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return view


def load_transcoders(folder: Path):
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    if not (folder / "config.yaml").is_file():
        raise JobError(f"{folder} holds no config.yaml: export the transcoders with sae-export ... "
                       "--format circuit-tracer")
    model, _ = load_transcoders_from_cache(folder.name, cache_dir=folder.parent, device=CPU, dtype=torch.float32)
    return model


def replacement_model(model_dir: Path, view_dir: Path, transcoders):
    """circuit-tracer's TransformerLens ReplacementModel of the HF model in ``model_dir``."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    view = transformers4_view(model_dir, view_dir)
    tok = AutoTokenizer.from_pretrained(str(view))
    hf = AutoModelForCausalLM.from_pretrained(str(view), dtype=torch.float32).eval()
    try:
        cfg = get_pretrained_model_config(str(view), dtype=torch.float32, device="cpu")
    except Exception as e:  # TransformerLens names the architecture it cannot convert
        raise JobError(f"TransformerLens (circuit-tracer's backend) cannot build {model_dir}: {e}; trace a causal LM "
                       "of a family it converts (Llama, GPT-2, Gemma, Qwen, Mistral, ...)") from None
    theta = getattr(hf.config, "rope_theta", None)
    if theta is not None:
        cfg.rotary_base = float(theta)
    d_model = getattr(transcoders, "d_model", None) or transcoders[0].d_model  # a CLT's, or layer 0's
    if transcoders.n_layers != cfg.n_layers or d_model != cfg.d_model:
        raise JobError(f"the transcoders cover {transcoders.n_layers} layers of width {d_model}, the "
                       f"model has {cfg.n_layers} layers of width {cfg.d_model}: export one transcoder per layer of "
                       "this model")
    state = get_pretrained_state_dict(str(view), cfg, hf_model=hf)
    rm = TransformerLensReplacementModel.from_config(cfg, transcoders, tokenizer=tok)
    renamed = {}
    for k, v in state.items():
        k = k.replace(".mlp.", ".mlp.old_mlp.")
        renamed["unembed.old_unembed." + k.removeprefix("unembed.") if k.startswith("unembed.") else k] = v
    missing, unexpected = rm.load_state_dict(renamed, strict=False)
    # The transcoders are loaded already; the rotary tables are rebuilt from cfg.rotary_base.
    derived = ("IGNORE", "mask", "rotary_sin", "rotary_cos")
    missing = [k for k in missing if not k.startswith("transcoders.") and not k.endswith(derived)]
    if missing or unexpected:
        raise JobError(f"the converted weights do not fit circuit-tracer's model: missing {missing[:5]}, unexpected "
                       f"{unexpected[:5]}")
    return rm.eval(), hf, tok


@torch.no_grad()
def logit_difference(rm, hf, tok, prompt: str) -> float:
    ids = rm.to_tokens(prompt)
    mine = rm(ids)
    theirs = hf(ids).logits
    return float((mine - theirs).abs().max())


def run(job: dict[str, Any]) -> dict[str, Any]:
    import transformers
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores

    torch.set_grad_enabled(True)
    start = time.perf_counter()
    transcoders = load_transcoders(Path(job["transcoders"]))
    rm, hf, tok = replacement_model(Path(job["model"]), Path(job["view_dir"]), transcoders)
    diff = logit_difference(rm, hf, tok, job["prompts"][0])
    if diff > LOGIT_TOLERANCE:
        raise JobError(f"circuit-tracer's model of {job['model']} gives logits up to {diff:.3g} away from the HF "
                       "model's: its graphs would be wrong; this model needs a conversion fix in sae_peers.graph")
    del hf
    loaded = time.perf_counter() - start
    graphs = Path(job["graphs_dir"]) if job.get("graphs_dir") else None
    if graphs:
        graphs.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(job["prompts"]):
        t = time.perf_counter()
        graph = attribute(prompt, rm, max_n_logits=job.get("max_n_logits", 10),
                          desired_logit_prob=job.get("desired_logit_prob", 0.95), batch_size=job.get("batch_size", 256),
                          max_feature_nodes=job.get("max_feature_nodes"), verbose=False)
        replacement, completeness = compute_graph_scores(graph)
        rows.append({"prompt": prompt, "tokens": len(graph.input_tokens), "active_features": len(graph.active_features),
                     "selected_features": len(graph.selected_features), "logits": len(graph.logit_targets),
                     "replacement_score": float(replacement), "completeness_score": float(completeness),
                     "seconds": time.perf_counter() - t})
        if graphs:
            graph.to_pt(str(graphs / f"graph_{i}.pt"))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("replacement_score", "completeness_score")}
    return {"backend": "transformerlens", "logit_max_abs_diff_vs_hf": diff, "load_seconds": loaded,
            "versions": {"circuit_tracer": _version("circuit-tracer"), "transformer_lens": _version("transformer-lens"),
                         "transformers": transformers.__version__, "torch": torch.__version__},
            "prompts": rows, "mean": mean}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    try:
        result = run(job)
    except JobError as e:
        result = {"error": str(e)}
    Path(job["out"]).write_text(json.dumps(result, indent=2))
    if "error" in result:
        print(result["error"], file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
