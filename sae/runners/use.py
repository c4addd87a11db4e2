"""``sae-steer`` and ``sae-attribute``: the command-line side of :mod:`.steer` and :mod:`.attribute`.

Both load the SAE with :func:`sae.export.load_pretrained` (our, SAELens or sparsify format, a
folder or a Hub repo; raw-activation space) and the causal LM it was trained on (recorded in the
SAE's folder, or ``--model``), at the hook point it was trained on (or ``--hook``). An error prints
as one line, ``sae-steer: error: ...``, and exits with status 1, as the Hydra commands do
(``sae.runners.cli``); ``SAE_DEBUG=1`` shows the traceback instead. Flags are checked before anything loads,
prompts and positions before the model runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STEER_HELP = """Generate with and without SAE-latent interventions; write steering.jsonl and steering.html.

  sae-steer --sae runs/x/final/topk --prompt "The capital of France is" --intervene add:123:8
  sae-steer --sae out/layers.3 --model gpt2 --prompts prompts.txt --intervene clamp:77:0@5 --out runs/steer

Interventions (repeatable): add:LATENT:COEFFICIENT (adds COEFFICIENT x W_dec[LATENT]) or
clamp:LATENT:VALUE (sets the latent to VALUE, keeping the SAE's error term; VALUE may be 'own'),
each optionally followed by @POSITION (from that token position on)."""

ATTRIBUTE_HELP = """Attribute the logit of a target token to SAE latents (activation x gradient, every position).

  sae-attribute --sae runs/x/final/topk --prompt "The capital of France is" --target " Paris" --check 10"""


DEBUG_ENV = "SAE_DEBUG"


@contextmanager
def reports_errors(prog: str) -> Iterator[None]:
    """Exit with ``<prog>: error: <message>`` on one line (status 1) when the block raises; an
    unexpected error type is named with the hint to set ``SAE_DEBUG=1``, which re-raises instead."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 (every error becomes one line; SAE_DEBUG shows all)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        expected = isinstance(e, (ValueError, OSError))
        hint = "" if expected else f" ({type(e).__name__}; set {DEBUG_ENV}=1 for the traceback)"
        sys.exit(f"{prog}: error: {' '.join(str(e).splitlines())}{hint}")


def at_least(flag: str, value: int, low: int, meaning: str) -> None:
    """Refuse ``flag value`` below ``low``, saying what the flag means."""
    if value < low:
        raise ValueError(f"{flag} {value} must be >= {low} ({meaning})")


def prompt_list(a: argparse.Namespace) -> list[str]:
    """``--prompt`` (repeatable) then the non-empty lines of the ``--prompts`` file."""
    return list(a.prompt) + ([ln for ln in Path(a.prompts).read_text().splitlines() if ln.strip()]
                             if a.prompts else [])


def recorded_model(info) -> str:
    """The model an SAE was trained on, from what its folder records ("" when nothing does)."""
    if info.model_name:
        return info.model_name
    data = (info.cfg or {}).get("data") or {}
    if data.get("source") == "live":
        return ((data.get("live") or {}).get("model") or {}).get("name", "")
    path = (data.get("buffer") or {}).get("path")
    if data.get("source") == "buffer" and path and (Path(path) / "manifest.json").is_file():
        return json.loads((Path(path) / "manifest.json").read_text()).get("model", {}).get("name", "")
    return ""


def load(args) -> tuple[Any, Any, Any, str]:
    """(causal LM, tokenizer, SAE, hook point) from the shared arguments."""
    from sae.eval.lm import load_eval_model
    from sae.export import load_pretrained_with_info
    from sae.harvest.config import ModelConfig

    info = load_pretrained_with_info(args.sae, args.sae_hookpoint or None, device="cpu")
    model_name = args.model or recorded_model(info)
    if not model_name:
        raise ValueError(f"{args.sae} does not record the model it was trained on; pass --model")
    hook = args.hook or info.hookpoint
    if not hook:
        raise ValueError(f"{args.sae} does not record its hook point; pass --hook")
    lm, kind = load_eval_model(ModelConfig(name=model_name, device=args.device, dtype=args.dtype), "causal_lm")
    return lm.model, lm.tokenizer, info.sae.to(lm.device), hook


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE folder or Hub repo (our, SAELens or sparsify format)")
    p.add_argument("--sae-hookpoint", default="", help="which SAE of a folder/repo holding several")
    p.add_argument("--model", default="", help="causal LM (default: the one the SAE records)")
    p.add_argument("--hook", default="", help="hook point (default: the one the SAE records)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")


def steer_main(argv: list[str] | None = None) -> None:
    from sae.use.steer import Intervention, describe, steer_prompts, write_outputs

    p = argparse.ArgumentParser(prog="sae-steer", description=STEER_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--prompts", default="", help="a text file, one prompt per line")
    p.add_argument("--intervene", action="append", default=[], help="add:LATENT:COEF or clamp:LATENT:VALUE[@POS]")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--out", default="runs/steer")
    a = p.parse_args(argv)
    with reports_errors("sae-steer"):
        prompts = prompt_list(a)
        if not prompts or not a.intervene:
            raise ValueError("give at least one --prompt (or --prompts FILE) and one --intervene")
        at_least("--max-new-tokens", a.max_new_tokens, 1, "tokens generated per prompt")
        ivs = [Intervention.parse(t) for t in a.intervene]
        model, tok, sae, hook = load(a)
        rows = steer_prompts(model, tok, sae, hook, prompts, ivs, a.max_new_tokens)
        jsonl, page = write_outputs(rows, a.out, f"Steering at {hook}: {a.sae}")
    for r in rows:
        print(f"prompt:   {r['prompt']!r}\n baseline: {r['baseline']!r}\n steered:  {r['steered']!r}")
    print(f"{'; '.join(describe(iv) for iv in rows[0]['interventions'])}\nwrote {jsonl} and {page}")


def attribute_main(argv: list[str] | None = None) -> None:
    from sae.use.attribute import attribute

    p = argparse.ArgumentParser(prog="sae-attribute", description=ATTRIBUTE_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--target", required=True, help="the next token (one token) or its id (#ID)")
    p.add_argument("--position", type=int, default=-1, help="whose next-token logit (default: the last)")
    p.add_argument("--from-position", type=int, default=None,
                   help="attribute (and ablate) latents from this position on (default 1, unless the target follows "
                        "the first token: the first token is an attention sink, see sae.use.attribute; 0 counts it)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--check", type=int, default=0, help="also ablate the top N latents and compare ranks")
    p.add_argument("--out", default="", help="write the attributions as JSON here")
    a = p.parse_args(argv)
    with reports_errors("sae-attribute"):
        if len(a.prompt) != 1:
            raise ValueError(f"give exactly one --prompt (got {len(a.prompt)})")
        at_least("--top", a.top, 1, "how many latents to list")
        if a.check == 1 or a.check < 0:
            raise ValueError(f"--check {a.check}: give 0 (no ablation check) or N >= 2 (ablate the top N latents and "
                             "compare ranks; a rank correlation needs two)")
        model, tok, sae, hook = load(a)
        target = int(a.target[1:]) if a.target.startswith("#") and a.target[1:].isdigit() else a.target
        result = attribute(model, tok, sae, hook, a.prompt[0], target, a.position, a.from_position)
        _report_attribution(a, result, model, tok, sae, hook)


def _report_attribution(a: argparse.Namespace, result, model, tok, sae, hook: str) -> None:
    from sae.use.attribute import ablation_effects, spearman

    print(f"target {result.target!r} (id {result.target_id}) after position {result.position}: logit "
          f"{result.logit:.4f}\n latent   attribution")
    for latent, total in result.top(a.top):
        print(f" {latent:6d}   {total:+.5f}")
    out = result.as_json(max(a.top, a.check))
    if a.check:
        top = [latent for latent, _ in result.top(a.check)]
        effects = ablation_effects(model, tok, sae, hook, result, top)
        rho = spearman([result.totals[latent] for latent in top], [effects[latent] for latent in top])
        out["ablation_check"] = {"effects": effects, "spearman": rho}
        print(f"ablating the top {len(top)} one at a time: rank correlation with the attributions {rho:.3f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {a.out}")


GRAPH_HELP = """Attribution graphs by circuit-tracer over a model's transcoders; prints each prompt's replacement and
completeness scores (circuit-tracer's compute_graph_scores) and writes them to OUT/graph_scores.json and .md.

  sae-graph runs/tc/final/jumprelu@* --out runs/tc/graph --prompt "The capital of France is"
  sae-graph runs/tc/circuit-tracer --out runs/tc/graph --prompts prompts.txt --max-feature-nodes 2048

TRANSCODERS: one folder written by sae-export --format circuit-tracer, or the trained transcoders (one per
layer, or a CLT: run or SAE folders), exported into OUT/transcoders first. circuit-tracer runs in the
peers venv (bash launch/peers_env.sh)."""


def graph_main(argv: list[str] | None = None) -> None:
    from sae.use.graph import GraphSettings, format_scores, trace

    p = argparse.ArgumentParser(prog="sae-graph", description=GRAPH_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("transcoders", nargs="+", help="circuit-tracer folder, or run / SAE folders to export into it")
    p.add_argument("--out", required=True, help="folder for the scores (and transcoders/, graphs/)")
    p.add_argument("--model", default="", help="the model (default: the one the transcoders record)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default="", help="a text file, one prompt per line")
    p.add_argument("--max-feature-nodes", type=int, default=GraphSettings.max_feature_nodes)
    p.add_argument("--batch-size", type=int, default=GraphSettings.batch_size,
                   help="source nodes per backward pass (memory)")
    p.add_argument("--save-graphs", action="store_true", help="save each graph (circuit-tracer's .pt) in OUT/graphs")
    a = p.parse_args(argv)
    with reports_errors("sae-graph"):
        prompts = prompt_list(a)
        if not prompts:
            raise ValueError("give a prompt to trace: --prompt TEXT or --prompts FILE")
        at_least("--max-feature-nodes", a.max_feature_nodes, 1, "features kept in each graph")
        at_least("--batch-size", a.batch_size, 1, "source nodes per backward pass")
        out = Path(a.out)
        folder = Path(a.transcoders[0])
        if len(a.transcoders) > 1 or not (folder / "config.yaml").is_file():
            from sae.export import export_checkpoint

            folder = out / "transcoders"
            sources = a.transcoders[0] if len(a.transcoders) == 1 else a.transcoders
            export_checkpoint(sources, folder, "circuit-tracer", overwrite=folder.exists())
            print(f"exported the transcoders to {folder} (circuit-tracer)")
        settings = GraphSettings(prompts=prompts, max_feature_nodes=a.max_feature_nodes, batch_size=a.batch_size)
        result = trace(folder, settings, model=a.model, graphs_dir=out / "graphs" if a.save_graphs else None)
        out.mkdir(parents=True, exist_ok=True)
        table = format_scores(result)
        (out / "graph_scores.json").write_text(json.dumps(result, indent=1))
        (out / "graph_scores.md").write_text(table + "\n")
        print(table)
        print(f"circuit-tracer {result['versions']['circuit_tracer']} ({result['backend']} backend; its logits within "
              f"{result['logit_max_abs_diff_vs_hf']:.1g} of the HF model's); wrote {out / 'graph_scores.json'}")
