"""Weights & Biases tracking of a training run: a :class:`MetricLogger` backend plus run-level extras.

Enabled with ``wandb.enabled=true`` (``WandbConfig`` is the ``wandb`` node of ``sae-train``). Only
rank 0 builds it (``run_training``), so a distributed run is one W&B run. What it records:

- the resolved run config (``wandb.config``: sae, train, data, variants);
- every metric the trainer logs, under our keys (``train/loss/<sae>``, ``train/fvu/<sae>``,
  ``train/l0/<sae>``, ``train/lr/<sae>``, ``train/dead_fraction/<sae>``, ``train/tokens``) and the
  periodic held-out evaluation (``eval/<metric>/<sae>``), at the trainer's step;
- ``eval/feature_density/<sae>``: a ``wandb.Histogram`` of log10 firing frequency of the live latents
  on held-out batches, every ``histogram_every`` steps (dead latents are counted in
  ``eval/dead_fraction``), and once more for the final SAEs;
- the final held-out metrics in the run summary (``final/<metric>/<sae>``) and, with
  ``log_artifact``, the ``final/<sae>`` folders as a ``model`` artifact.

``WANDB_MODE=offline`` (or ``wandb.mode=offline``) writes the run under ``<dir>/wandb/`` without
network; ``wandb sync`` uploads it later. W&B sweeps work unchanged: the agent's environment
(``WANDB_SWEEP_ID``, ``WANDB_RUN_ID``) makes ``wandb.init`` join the sweep's run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae.buffer.source import Batch
from sae.eval.quick import batches_of
from sae.models import SparseCoder

log = logging.getLogger(__name__)

MODES = ("", "online", "offline", "disabled")


@dataclass
class WandbConfig:
    """W&B tracking (off by default)."""

    enabled: bool = False
    project: str = "sae-forge"
    entity: str = ""  # "" : your default entity
    name: str = ""  # run name; "" : W&B generates one
    group: str = ""  # e.g. a sweep or an experiment family
    tags: list[str] = field(default_factory=list)
    mode: str = ""  # "" (WANDB_MODE, else online) | online | offline | disabled
    dir: str = ""  # where wandb/ run folders go; "" : train.out_dir
    histogram_every: int = 0  # steps between feature-density histograms; 0 : train.eval_every (0 there: final only)
    log_artifact: bool = False  # upload final/<sae> folders as a "model" artifact at the end


def validate_wandb(cfg: WandbConfig) -> None:
    """Raise ``ValueError`` naming the first bad field, its value, and the fix."""
    checks = [
        (cfg.mode in MODES, "mode", cfg.mode, "must be empty, online, offline or disabled"),
        (not cfg.enabled or bool(cfg.project), "project", cfg.project, "must name a W&B project"),
        (cfg.histogram_every >= 0, "histogram_every", cfg.histogram_every, "must be >= 0"),
    ]
    for ok, name, value, msg in checks:
        if not ok:
            raise ValueError(f"wandb.{name}={value!r} {msg}")


@torch.no_grad()
def firing_frequencies(sae: SparseCoder, batches: Sequence[Batch], device: torch.device | str) -> tuple[Any, int]:
    """([L] fraction of held-out tokens on which each latent fired, number of tokens) in inference mode."""
    from sae.eval.metrics import SparsityStats

    was_training = sae.training
    sae.eval()
    stats = SparsityStats(sae.num_latents)
    try:
        for b in batches:
            stats.update(sae.encode(b.x.to(device).float()))
    finally:
        sae.train(was_training)
    return stats.frequencies, stats.n_tokens


def all_frequencies(saes: dict[str, SparseCoder], batches: Sequence[Batch] | dict[str, Sequence[Batch]],
                    device: torch.device | str) -> dict[str, tuple[Any, int]]:
    """:func:`firing_frequencies` of every SAE on its held-out batches (on CPU, ready to gather)."""
    out = {}
    for name, sae in saes.items():
        freq, n = firing_frequencies(sae, batches_of(batches, name), device)
        out[name] = (freq.cpu(), n)
    return out


def density_hook(logger: WandbLogger | None, batches: Sequence[Batch] | dict[str, Sequence[Batch]], every: int,
                 gather: Callable[[Any], list[Any]] | None = None):
    """A trainer step hook logging feature-density histograms every ``every`` steps.

    With SAEs spread across ranks (``train.parallel=sae``) every rank installs it with ``gather``
    (a collective such as ``dist.all_gather_objects``): each scores its own SAEs and the rank
    holding the W&B run (``logger`` not None) logs all of them.
    """
    if every <= 0:
        raise ValueError(f"wandb.histogram_every={every} must be > 0 for periodic histograms")
    batches = {n: list(b) for n, b in batches.items()} if isinstance(batches, dict) else list(batches)

    def hook(trainer) -> None:
        if trainer.step % every:
            return
        freqs = all_frequencies(trainer.saes, batches, trainer.device)
        if gather is not None:
            freqs = {k: v for part in gather(freqs) for k, v in part.items()}
        if logger is not None:
            logger.log_frequencies(freqs, trainer.step)

    return hook


class WandbLogger:
    """A W&B run that the trainer logs into; ``finish`` ends it after the final evaluation.

    ``close`` (called by ``Trainer.fit``) keeps the run open so the final metrics, histogram and
    artifact land in the same run; a run left open is finished by wandb's exit hook.
    """

    def __init__(self, cfg: WandbConfig, config: dict[str, Any], out_dir: str | Path):
        import wandb

        validate_wandb(cfg)
        self.cfg = cfg
        self._wandb = wandb
        run_dir = Path(cfg.dir or out_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or None,
                              group=cfg.group or None, tags=list(cfg.tags) or None, mode=cfg.mode or None,
                              dir=str(run_dir), config=config)
        log.info("W&B run %s (%s)", self.run.name, self.run.dir)

    # --- MetricLogger ------------------------------------------------------------------------
    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        pass

    # --- run-level extras --------------------------------------------------------------------
    def log_density(self, saes: dict[str, SparseCoder], batches: Sequence[Batch] | dict[str, Sequence[Batch]],
                    step: int, device: torch.device | str = "cpu", prefix: str = "eval") -> None:
        """Log ``<prefix>/feature_density/<sae>`` histograms of log10 firing frequency at ``step``."""
        self.log_frequencies(all_frequencies(saes, batches, device), step, prefix)

    def log_frequencies(self, freqs: dict[str, tuple[Any, int]], step: int, prefix: str = "eval") -> None:
        """Log histograms from precomputed ``{sae: (per-latent firing frequency, tokens)}``."""
        from sae.eval.metrics import log10_density_histogram

        out = {}
        for name, (freq, n) in freqs.items():
            hist = log10_density_histogram(freq, n_tokens=n)
            out[f"{prefix}/feature_density/{name}"] = self._wandb.Histogram(np_histogram=(hist.counts, hist.edges))
        self.run.log(out, step=step)

    def density_hook(self, batches: Sequence[Batch] | dict[str, Sequence[Batch]], every: int):
        """A trainer step hook logging the feature-density histograms every ``every`` steps."""
        return density_hook(self, batches, every)

    def finish(self, final_metrics: dict[str, dict[str, float]], final_dirs: dict[str, Path], *,
               saes: dict[str, SparseCoder] | None = None,
               batches: Sequence[Batch] | dict[str, Sequence[Batch]] = (), step: int | None = None,
               device: torch.device | str = "cpu", reports: dict[str, dict[str, Any]] | None = None,
               frequencies: dict[str, tuple[Any, int]] | None = None) -> None:
        """Record the final held-out metrics (summary), the final densities, the artifact; end the run.

        ``frequencies`` (SAE name -> (firing frequency, tokens)) replaces computing the final
        densities from ``saes``/``batches``. ``reports`` (SAE name -> sae-eval report.json content)
        adds the full evaluation's metrics as ``final_eval/<metric>/<sae>`` and its spliced-model
        metrics as ``final_eval/splice_<metric>/<sae>``.
        """
        at = step if step is not None else self.run.step
        if frequencies:  # precomputed (gathered from the ranks that hold the SAEs)
            self.log_frequencies(frequencies, at, prefix="final")
        elif saes and batches:
            self.log_density(saes, batches, at, device, prefix="final")
        summary = {f"final/{k}/{name}": v for name, m in final_metrics.items() for k, v in m.items()}
        for name, report in (reports or {}).items():
            splice = (report.get("splice") or {}).get("metrics") or {}
            numbers = {**report.get("metrics", {}), **{f"splice_{k}": v for k, v in splice.items()}}
            summary.update({f"final_eval/{k}/{name}": v for k, v in numbers.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        self.run.summary.update(summary)
        if self.cfg.log_artifact and final_dirs:
            art = self._wandb.Artifact(f"sae-{self.run.id}", type="model",
                                       metadata={"saes": sorted(final_dirs), "final": final_metrics})
            for name, folder in final_dirs.items():
                art.add_dir(str(folder), name=name)
            self.run.log_artifact(art)
        self.run.finish()
