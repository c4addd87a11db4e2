"""What end-to-end training costs: time and memory per token of train.loss=kl / kl+mse / ce against
MSE training, both live from text (``python -m sae.bench.end_to_end``).

Each loss trains the same TopK SAE for ``--warmup + --steps`` steps in a process of its own (so each
peak RSS is its own); the table gives the median step time after the warm-up, tokens per second
(the kept positions a step trains on), the peak RSS and the ratios to MSE. MSE training harvests
each step's tokens in a background thread, up to the hook point (the forward stops there); an
end-to-end step runs the whole model once without gradients (clean) and the blocks above the hook
point once more with them (spliced; the blocks below hand on the clean output), then
back-propagates through those blocks and the LM head.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from .common import markdown_table, peak_rss_mib

LOSSES = ("mse", "kl", "kl+mse", "ce")


def measure(loss: str, model: str, hookpoint: str, batch: int, context: int, steps: int, warmup: int,
            expansion: int, k: int, text: str = "") -> dict[str, Any]:
    """Train ``steps + warmup`` steps with ``loss``; time and memory figures of this process."""
    import torch

    from sae.buffer.config import LiveConfig
    from sae.buffer.live import LiveSource
    from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
    from sae.models import SAEConfig, build_sae
    from sae.train.config import TrainConfig
    from sae.train.end_to_end import ContextSource, EndToEnd
    from sae.train.trainer import Trainer

    torch.manual_seed(0)
    # Mixing blocks of one step's tokens: every MSE step harvests its own (a larger block would time
    # the warm-up's harvest and then steps that only read memory).
    text_cfg = TextConfig(context_length=context, **({"name": text} if text else {}))
    live = LiveConfig(model=ModelConfig(name=model, device="cpu"), text=text_cfg,
                      harvest=HarvestConfig(progress=False, batch_size=batch // context), heldout_contexts=8,
                      mixing_tokens=batch)
    if loss == "mse":
        source, objective = LiveSource(live, batch, hookpoint=hookpoint), None
    else:
        source = ContextSource(live, batch, hookpoint=hookpoint, loss=loss)
        objective = EndToEnd(source, loss)
    loaded_mib = peak_rss_mib()
    sae = build_sae(SAEConfig(architecture="topk", expansion_factor=expansion, k=k), source.d_in, source.d_out)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(batch_size=batch, steps=warmup + steps, lr=1e-3, lr_warmup_steps=1, progress=False,
                          eval_every=0, final_report=False, log_every=10**9, loss=loss, out_dir=out, device="cpu")
        trainer = Trainer(cfg, {"sae": sae}, source, objective=objective)
        marks: list[float] = []
        trainer.step_hooks.append(lambda t: marks.append(time.perf_counter()))
        trainer.fit()
    per_step = statistics.median(b - a for a, b in zip(marks[warmup:], marks[warmup + 1:]))
    tokens = trainer.tokens / trainer.step
    return {"loss": loss, "s_per_step": per_step, "tokens_per_step": tokens, "tokens_per_s": tokens / per_step,
            "model_rss_mib": loaded_mib, "peak_rss_mib": peak_rss_mib()}


def run(losses: list[str], **kw: Any) -> list[dict[str, Any]]:
    """:func:`measure` of each loss, each in a fresh process."""
    rows = []
    for loss in losses:
        args = [sys.executable, "-m", "sae.bench.end_to_end", "--one", loss] + \
            [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the {loss} run failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["loss"] == "mse"), rows[0])
    return markdown_table(
        ["train.loss", "s/step", "tokens/step", "tokens/s", "time per token vs mse", "peak RSS MiB",
         "above the loaded model MiB", "memory vs mse"],
        [[r["loss"], round(r["s_per_step"], 3), round(r["tokens_per_step"]), round(r["tokens_per_s"]),
          f"{base['tokens_per_s'] / r['tokens_per_s']:.2f}x", round(r["peak_rss_mib"]),
          round(r["peak_rss_mib"] - r["model_rss_mib"]),
          f"{(r['peak_rss_mib'] - r['model_rss_mib']) / max(base['peak_rss_mib'] - base['model_rss_mib'], 1):.2f}x"]
         for r in rows])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model.name: a packaged model or a local folder")
    p.add_argument("--hookpoint", default="layers.15")
    p.add_argument("--text", default="", help="text.name (default: the built-in corpus)")
    p.add_argument("--losses", default=",".join(LOSSES[:3]), help=f"comma-separated, of {', '.join(LOSSES)}")
    p.add_argument("--batch", type=int, default=2048, help="tokens per step (a multiple of --context)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one loss, JSON on stdout
    a = p.parse_args(argv)
    kw = dict(model=a.model, hookpoint=a.hookpoint, batch=a.batch, context=a.context, steps=a.steps, warmup=a.warmup,
              expansion=a.expansion, k=a.k, text=a.text)
    if a.one:
        print(json.dumps(measure(a.one, **kw)))
        return
    losses = [s for s in a.losses.split(",") if s]
    bad = sorted(set(losses) - set(LOSSES))
    if bad:
        p.error(f"--losses {bad}: choose from {', '.join(LOSSES)}")
    import torch

    print(f"{a.model} at {a.hookpoint}: TopK {a.expansion}x k={a.k}, {a.batch} tokens a step ({a.batch // a.context} "
          f"contexts of {a.context}), median of {a.steps} steps after {a.warmup}; {torch.get_num_threads()} threads",
          flush=True)
    print(table(run(losses, **kw)))


if __name__ == "__main__":
    main()
