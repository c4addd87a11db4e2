"""Single-process trainer for one or many sparse coders fed by one ActivationSource.

Several SAEs (e.g. a sweep over k) train in one pass: each batch is read once and every SAE
takes a step on it. The loop order per SAE follows Gao et al. 2024: forward with the current dead
mask (AuxK), backward, remove the gradient component parallel to decoder rows, clip, Adam step,
renormalise decoder rows, update dead-latent counters.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae.buffer.source import ActivationSource, Batch, check_finite
from sae.models import SparseCoder, fired_counts, l0_per_token

from .artifact import load_sae, save_sae
from .checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from .config import TrainConfig
from .dead import DeadLatentTracker
from .logger import MetricLogger, NullLogger
from .schedule import build_optimizer, build_scheduler, default_lr

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use train.device=cpu")
    return dev


def validate_train_config(cfg: TrainConfig) -> None:
    checks = [
        (cfg.batch_size > 0, "batch_size", "must be positive"),
        (cfg.steps > 0 or cfg.max_tokens >= cfg.batch_size, "max_tokens", "must cover at least one batch"),
        (cfg.lr is None or (cfg.lr > 0 and math.isfinite(cfg.lr)), "lr",
         "must be positive (or null for the scaling rule)"),
        (cfg.lr_decay in ("constant", "linear", "cosine"), "lr_decay", "must be constant, linear or cosine"),
        (cfg.mixed_precision in ("no", "bf16"), "mixed_precision", "must be no or bf16"),
        (0 <= cfg.lr_decay_start <= 1, "lr_decay_start", "must be in [0, 1]"),
        (cfg.eps > 0 and 0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "eps/beta1/beta2", "are out of range"),
    ]
    for ok, name, msg in checks:
        if not ok:
            raise ValueError(f"train.{name}={getattr(cfg, name.split('/')[0])!r} {msg}")


class Trainer:
    def __init__(self, cfg: TrainConfig, saes: dict[str, SparseCoder], source: ActivationSource, *,
                 logger: MetricLogger | None = None, sae_meta: dict[str, Any] | None = None):
        validate_train_config(cfg)
        if not saes:
            raise ValueError("no SAE to train")
        self.cfg, self.source = cfg, source
        self.logger = logger or NullLogger()
        self.sae_meta = sae_meta or {}
        self.device = resolve_device(cfg.device)
        self.out_dir = Path(cfg.out_dir)
        for name, sae in saes.items():
            if sae.d_in != source.d_in or sae.d_out != source.d_out:
                raise ValueError(
                    f"SAE {name!r} expects d_in={sae.d_in}, d_out={sae.d_out} but the activations have "
                    f"d_in={source.d_in}, d_out={source.d_out}"
                )
        self.saes = {name: sae.to(self.device) for name, sae in saes.items()}
        self.total_steps = cfg.steps if cfg.steps > 0 else cfg.max_tokens // cfg.batch_size
        self.optimizers, self.schedulers, self.trackers, self.base_lrs = {}, {}, {}, {}
        for name, sae in self.saes.items():
            lr = cfg.lr if cfg.lr is not None else default_lr(sae.num_latents)
            self.base_lrs[name] = lr
            self.optimizers[name] = build_optimizer(sae.parameters(), lr, cfg)
            self.schedulers[name] = build_scheduler(self.optimizers[name], self.total_steps, cfg)
            self.trackers[name] = DeadLatentTracker(sae.num_latents, cfg.dead_tokens_threshold, self.device)
        self.step = 0
        self.tokens = 0
        self.last_metrics: dict[str, float] = {}

    # --- public ---------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train to the budget (resuming if a checkpoint exists); return the last metrics."""
        if self.cfg.resume:
            self.maybe_resume()
        batches = iter(self.source)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.cfg.progress,
                   unit="step", dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                try:
                    batch = next(batches)
                except StopIteration:
                    log.warning("activation source exhausted after %d steps", self.step)
                    break
                if self.step == 0:
                    self.init_from_data(batch)
                metrics = self.train_step(batch)
                bar.update(1)
                if metrics:
                    bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in metrics.items()
                                     if k.startswith(("train/fvu", "train/l0")) and len(self.saes) == 1})
                if self.cfg.checkpoint_every > 0 and self.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        self.save_checkpoint()
        self.save_final()
        self.logger.close()
        return self.last_metrics

    def init_from_data(self, batch: Batch) -> None:
        """Data-dependent init (b_dec, JumpReLU thresholds) from the first batch, before the first step."""
        n = self.cfg.b_dec_init_samples
        x = batch.x[:n].to(self.device).float()
        y = batch.y[:n].to(self.device).float() if batch.y is not None else None
        for sae in self.saes.values():
            sae.init_from_data(x, y)

    def autocast(self):
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: Batch) -> dict[str, float]:
        x = batch.x.to(self.device, non_blocking=True)
        y = batch.y.to(self.device, non_blocking=True) if batch.y is not None else None
        check_finite(x, f"activation batch at step {self.step}")
        if y is not None:
            check_finite(y, f"target batch at step {self.step}")
        n_tokens = x.shape[0]
        log_now = self.step % self.cfg.log_every == 0 or self.step == self.total_steps - 1
        metrics: dict[str, float] = {}
        for name, sae in self.saes.items():
            tracker, opt = self.trackers[name], self.optimizers[name]
            warm = sae.cfg.sparsity_warmup_steps
            with self.autocast():
                out = sae(x.float(), None if y is None else y.float(), dead_mask=tracker.dead_mask,
                          sparsity_scale=min(1.0, (self.step + 1) / warm) if warm > 0 else 1.0)
            loss = out.losses["loss"]
            loss.backward()
            sae.remove_parallel_grad_()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
            opt.step()
            self.schedulers[name].step()
            opt.zero_grad(set_to_none=True)
            sae.normalize_decoder_()
            with torch.no_grad():
                tracker.update(fired_counts(out.codes, sae.num_latents), n_tokens)
            if log_now:
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"SAE {name!r}: loss is {loss.item()} at step {self.step}; "
                                             "lower train.lr or check the activations")
                metrics.update(self._step_metrics(name, out, tracker, opt))
        self.step += 1
        self.tokens += n_tokens
        if log_now:
            metrics["train/tokens"] = float(self.tokens)
            self.logger.log(metrics, self.step)
            self.last_metrics = metrics
        return metrics

    # --- metrics, checkpoints -------------------------------------------------------------
    @staticmethod
    def _step_metrics(name: str, out, tracker: DeadLatentTracker, opt) -> dict[str, float]:
        m = {f"train/{k}/{name}": v.item() for k, v in out.losses.items()}
        m[f"train/l0/{name}"] = l0_per_token(out.codes).mean().item()
        m[f"train/dead_fraction/{name}"] = tracker.dead_fraction
        m[f"train/lr/{name}"] = opt.param_groups[0]["lr"]
        return m

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "trackers": {n: t.state_dict() for n, t in self.trackers.items()},
            "source": self.source.state_dict(),
            "rng": {"cpu": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.out_dir, self.step, self.saes, self.state_dict(),
                               keep=self.cfg.keep_checkpoints, sae_extra=self.sae_meta)

    def maybe_resume(self) -> bool:
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            return False
        state = load_trainer_state(ckpt)
        missing = set(self.saes) - {p.name for p in ckpt.iterdir() if p.is_dir()}
        if missing:
            raise ValueError(f"checkpoint {ckpt} lacks SAEs {sorted(missing)}; use a fresh train.out_dir")
        for name, sae in self.saes.items():
            sae.load_state_dict(load_sae(ckpt / name, self.device).state_dict())
            self.optimizers[name].load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
            self.trackers[name].load_state_dict(state["trackers"][name])
        self.source.load_state_dict(state["source"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True

    def save_final(self) -> dict[str, Path]:
        return {name: save_sae(sae, self.out_dir / "final" / name, **self.sae_meta)
                for name, sae in self.saes.items()}

