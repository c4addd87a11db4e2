"""Build and run a training job from a composed :class:`sae.config.TrainRunConfig`.

This is what ``sae-train`` calls after Hydra composes the config: it builds the activation
source, the SAEs (base + variants), the loggers and the trainer, trains, scores each SAE on
held-out batches, and writes ``summary.json`` next to the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sae.buffer.config import DataConfig, validate_data
from sae.buffer.source import ActivationSource, Batch
from sae.buffer.synthetic import SyntheticSource, feature_recovery
from sae.config import TrainRunConfig, sae_configs
from sae.eval.quick import PeriodicEval, evaluate_batches
from sae.models import build_sae

from . import dist
from .checkpoint import latest_checkpoint
from .logger import JsonlLogger, MultiLogger, NullLogger, StdoutLogger
from .reshard import consolidate_sae
from .strategy import build_strategy
from .trainer import Trainer, validate_train_config
from .wandb_logger import WandbLogger, validate_wandb

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out_dir: Path
    final_dirs: dict[str, Path]
    train_metrics: dict[str, float]
    eval_metrics: dict[str, dict[str, float]]
    reports: dict[str, Any] = dataclasses.field(default_factory=dict)
    """SAE name -> ``sae.eval.run.EvalResult`` of the full evaluation (``train.final_report``)."""


def build_source(data: DataConfig, batch_size: int, *, rank: int = 0, world_size: int = 1) -> ActivationSource:
    validate_data(data)
    if data.source == "synthetic":
        return SyntheticSource(data.synthetic, batch_size, rank=rank, world_size=world_size)
    if data.source == "buffer":
        from sae.buffer.reader import ShardReader

        return ShardReader.from_config(data, batch_size, rank=rank, world_size=world_size)
    from sae.buffer.live import LiveSource

    return LiveSource.from_config(data, batch_size, rank=rank, world_size=world_size)


def heldout_batches(source: ActivationSource, n_batches: int) -> list[Batch]:
    """Batches the trainer never sees (synthetic: indices beyond any training run; buffer: the
    held-out shards; live: the held-out contexts)."""
    if isinstance(source, SyntheticSource):
        return [source.batch(10**9 + i) for i in range(n_batches)]
    if hasattr(source, "heldout_batches"):
        return source.heldout_batches(n_batches)
    raise ValueError(f"no held-out split defined for {type(source).__name__}")


def check_checkpoint_sizes(out_dir: Path, source: ActivationSource) -> None:
    """Fail before training when ``out_dir`` holds checkpoints of SAEs of another width.

    Resuming would otherwise die deep inside ``load_state_dict`` with a shape error.
    """
    ckpt = latest_checkpoint(out_dir)
    for cfg_path in sorted(ckpt.glob("*/cfg.json")) if ckpt is not None else []:
        meta = json.loads(cfg_path.read_text())
        if (meta.get("d_in"), meta.get("d_out")) != (source.d_in, source.d_out):
            raise ValueError(
                f"{cfg_path.parent} was trained with d_in={meta.get('d_in')}, d_out={meta.get('d_out')}, but the "
                f"activations have d_in={source.d_in}, d_out={source.d_out} ({describe_source(source)}); "
                "use a fresh train.out_dir or the data it was trained on"
            )


def describe_source(source: ActivationSource) -> str:
    folder = getattr(source, "folder", None)
    hookpoint = getattr(source, "hookpoint", None)
    return ", ".join(f"{k} {v}" for k, v in (("buffer", folder), ("hook point", hookpoint)) if v) or type(
        source).__name__


def write_resolved_config(run: TrainRunConfig, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(run)))


def run_training(run: TrainRunConfig, *, heldout: int = 4) -> RunResult:
    validate_train_config(run.train)
    validate_wandb(run.wandb)
    cfgs = sae_configs(run)
    strategy = build_strategy(run.train.parallel)
    device = dist.init_from_env()  # None unless launched by torchrun / accelerate with WORLD_SIZE > 1
    if dist.world_size() > 1 and strategy.name == "none":
        raise ValueError(f"launched with {dist.world_size()} processes but train.parallel=none; "
                         "set train.parallel=data, latent or sae")
    torch.manual_seed(run.train.seed)
    rank, world = strategy.data_split()
    source = build_source(run.data, run.train.batch_size, rank=rank, world_size=world)
    if run.train.resume:
        check_checkpoint_sizes(Path(run.train.out_dir), source)
    # Build every SAE before writing anything, so bad sizes fail with nothing on disk.
    if run.train.init_from:
        saes = {"finetune": load_init_sae(run)}
    else:
        saes = {name: build_sae(c, source.d_in, source.d_out, seed=run.train.seed + i)
                for i, (name, c) in enumerate(cfgs.items())}
    out_dir = Path(run.train.out_dir)
    logger, wandb_logger = NullLogger(), None
    if dist.is_main():  # only rank 0 writes the config and logs
        write_resolved_config(run, out_dir)
        # The progress bar shows the live figures; log lines only when it is off.
        loggers = [JsonlLogger(out_dir / "metrics.jsonl")] + ([] if run.train.progress else [StdoutLogger()])
        if run.wandb.enabled:
            wandb_logger = WandbLogger(run.wandb, OmegaConf.to_container(OmegaConf.structured(run)), out_dir)
            loggers.append(wandb_logger)
        logger = MultiLogger(*loggers)
    meta = {"data": dataclasses.asdict(run.data)}
    if hasattr(source, "normalization"):
        meta["normalization"] = source.normalization
    trainer = Trainer(run.train, saes, source, logger=logger, sae_meta=meta, strategy=strategy, device=device,
                      data_init=not run.train.init_from)
    if run.train.eval_every > 0 and dist.is_main():
        if strategy.name == "latent":  # each rank holds a slice of the latents: nothing whole to score
            log.info("train.parallel=latent: no periodic held-out evaluation (the final one still runs)")
        else:
            batches = heldout_batches(source, run.train.eval_batches)
            trainer.step_hooks.append(PeriodicEval(batches, run.train.eval_every))
    histogram_every = run.wandb.histogram_every or run.train.eval_every
    if wandb_logger is not None and histogram_every > 0 and strategy.name != "latent":
        hist_batches = heldout_batches(source, run.train.eval_batches)
        trainer.step_hooks.append(wandb_logger.density_hook(hist_batches, histogram_every))
    train_metrics = trainer.fit()
    final_dirs = trainer.final_dirs
    if strategy.name == "latent":  # join the shards once; rank 0 scores the full SAE
        final_dirs = {n: out_dir / "final" / n for n in trainer.saes} if dist.is_main() else {}
        full = {n: consolidate_sae(out_dir / "final" / n) for n in final_dirs}
    else:
        full = trainer.saes
    batches = heldout_batches(source, heldout)
    eval_metrics: dict[str, dict[str, float]] = {}
    for name, sae in full.items():
        m = evaluate_batches(sae.to(trainer.device), batches, trainer.device)
        if isinstance(source, SyntheticSource):
            m["feature_recovery"] = feature_recovery(source.features, sae.W_dec.cpu()).item()
        eval_metrics[name] = m
    for part in dist.all_gather_objects((eval_metrics, {n: str(p) for n, p in final_dirs.items()})):
        eval_metrics.update(part[0])
        final_dirs.update({n: Path(p) for n, p in part[1].items()})
    reports = final_reports(final_dirs, str(trainer.device)) if run.train.final_report and dist.is_main() else {}
    if dist.is_main():
        summary: dict[str, Any] = {"steps": trainer.step, "tokens": trainer.tokens, "eval": eval_metrics,
                                   "final": {n: str(p) for n, p in final_dirs.items()},
                                   "reports": {n: str(r.report_json) for n, r in reports.items()},
                                   "world_size": dist.world_size(), "parallel": strategy.name}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if wandb_logger is not None:
        wandb_logger.finish(eval_metrics, final_dirs, saes=full, batches=batches, step=trainer.step,
                            device=trainer.device, reports={n: r.report for n, r in reports.items()})
    return RunResult(out_dir, final_dirs, train_metrics, eval_metrics, reports)


def load_init_sae(run: TrainRunConfig):
    """The published SAE named by ``train.init_from``, ready to fine-tune."""
    from sae.export import load_pretrained

    if run.variants:
        raise ValueError("train.init_from fine-tunes one published SAE; remove the variants")
    sae = load_pretrained(run.train.init_from, hookpoint=run.train.init_hookpoint or None)
    return sae.train()


def final_reports(final_dirs: dict[str, Path], device: str) -> dict[str, Any]:
    """Full evaluation (``sae-eval`` defaults) of each final SAE: report.json/html in final/<name>/eval/."""
    from sae.eval.config import EvalConfig
    from sae.eval.run import run_eval

    return {name: run_eval(EvalConfig(sae_path=str(d), device=device)) for name, d in final_dirs.items()}


def format_summary(result: RunResult) -> str:
    lines = [f"outputs: {result.out_dir}"]
    for name, m in result.eval_metrics.items():
        report = result.reports.get(name)
        if report is not None:  # the full evaluation: FVU, L0, dead %, spliced-model figure, report path
            from sae.eval.run import summary_line

            extra = [f"{k}={v:.3f}" for k, v in report.report["metrics"].items() if k == "feature_recovery"]
            lines.append(f"  {name}: {summary_line(report)}" + "".join(f" {e}" for e in extra)
                         + f"\n    weights: {result.final_dirs[name]}")
            continue
        parts = [f"fvu={m['fvu']:.4f}", f"l0={m['l0']:.1f}", f"dead={100 * m['dead_fraction']:.1f}%",
                 f"cos={m['cosine']:.3f}"]
        parts += [f"{k}={v:.3f}" for k, v in m.items() if k in ("feature_recovery",)]
        lines.append(f"  {name}: " + " ".join(parts) + f"  -> {result.final_dirs[name]}")
    return "\n".join(lines)


