"""Trainer for one or many sparse coders fed by one ActivationSource, on 1..N processes.

Several SAEs (e.g. a sweep over k) train in one pass: each batch is read once and every SAE
takes a step on it. The loop order per SAE follows Gao et al. 2024: forward with the current dead
mask (AuxK), backward, remove the gradient component parallel to decoder rows, clip, Adam step,
renormalise decoder rows, update dead-latent counters. A :mod:`strategy <sae.train.strategy>`
decides what is communicated; the trainer itself never calls ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sae_kernels.dispatch import Backend, resolve_backend
from torch import Tensor
from tqdm.auto import tqdm

from sae.buffer.device_feed import DeviceFeed
from sae.buffer.source import ActivationSource, Batch, source_identity
from sae.buffer.tensor_source import TensorSource
from sae.models import SparseCoder, token_variance

from . import dist
from .checkpointing import Checkpointing
from .config import LOSSES, TrainConfig
from .dead import DeadLatentTracker, resolve_dead_threshold
from .finite import NonFiniteWatch
from .graphed import GraphedSteps
from .logger import MetricLogger, NullLogger
from .optim import ADAM_STATE_DTYPES
from .schedule import build_optimizer, build_scheduler, default_lr
from .sparsity import SparsityController
from .strategy import SingleProcess

if TYPE_CHECKING:
    from .end_to_end import EndToEnd

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use train.device=cpu")
    return dev


def validate_train_config(cfg: TrainConfig) -> None:
    checks = [
        (cfg.batch_size > 0, "batch_size", "must be positive"),
        (cfg.steps >= 0, "steps", "must be >= 0 (0: train.max_tokens // train.batch_size steps)"),
        (cfg.steps > 0 or cfg.max_tokens >= cfg.batch_size, "max_tokens", "must cover at least one batch"),
        (cfg.lr is None or (cfg.lr > 0 and math.isfinite(cfg.lr)), "lr",
         "must be positive (or null for the scaling rule)"),
        (cfg.lr_decay in ("constant", "linear", "cosine"), "lr_decay", "must be constant, linear or cosine"),
        (cfg.mixed_precision in ("no", "bf16"), "mixed_precision", "must be no or bf16"),
        (0 <= cfg.lr_decay_start <= 1, "lr_decay_start", "must be in [0, 1]"),
        (cfg.eps > 0 and 0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "eps/beta1/beta2", "are out of range"),
        (cfg.grad_accum_steps >= 1 and cfg.batch_size % cfg.grad_accum_steps == 0, "grad_accum_steps",
         f"must be >= 1 and divide batch_size={cfg.batch_size}"),
        (cfg.eval_every >= 0, "eval_every", "must be >= 0 (0: no periodic evaluation)"),
        (cfg.eval_batches > 0, "eval_batches", "must be > 0"),
        (cfg.adam_state_dtype in ADAM_STATE_DTYPES, "adam_state_dtype", "must be float32 or bfloat16"),
        (cfg.prefetch_to_device >= 0, "prefetch_to_device", "must be >= 0 (0: off)"),
        (cfg.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}"),
        (cfg.mse_coefficient >= 0 and math.isfinite(cfg.mse_coefficient), "mse_coefficient", "must be >= 0"),
        (cfg.lr_warmup_steps is None or cfg.lr_warmup_steps >= 0, "lr_warmup_steps",
         "must be >= 0, or null (5% of the run, at most 1000 steps)"),
    ]
    for ok, name, msg in checks:
        if not ok:
            raise ValueError(f"train.{name}={getattr(cfg, name.split('/')[0])!r} {msg}")


class _ChunkVariance:
    """FVU denominator for gradient-accumulation chunks: the variance of the whole batch.

    With it the chunk losses sum to the full-batch FVU, so accumulation reproduces the gradient
    of one large batch. A column slice of the chunk's target (a cross-layer transcoder's FVU of
    one layer) gets the whole batch's variance of those columns. Other tensors (the AuxK
    residual) use the strategy's own statistic.
    """

    def __init__(self, target: Tensor, value: Tensor, fallback, full: Tensor):
        self.target, self.value, self.fallback, self.full = target, value, fallback, full
        self.columns: dict[tuple[int, int], Tensor] = {}

    def _column_slice(self, t: Tensor) -> tuple[int, int] | None:
        tg = self.target
        if (t.dim() != 2 or tg.dim() != 2 or t.shape[0] != tg.shape[0] or t.stride() != tg.stride()
                or t.untyped_storage().data_ptr() != tg.untyped_storage().data_ptr()):
            return None
        start = t.storage_offset() - tg.storage_offset()
        if tg.stride(1) != 1 or not 0 <= start <= tg.shape[1] - t.shape[1]:
            return None
        return start, start + t.shape[1]

    def __call__(self, t: Tensor) -> Tensor:
        if t is self.target:
            return self.value
        cols = self._column_slice(t)
        if cols is None:
            return self.fallback(t)
        if cols not in self.columns:
            self.columns[cols] = self.fallback(self.full[:, cols[0]:cols[1]])
        return self.columns[cols]


def as_source(source: Any, batch_size: int, rank: int, world_size: int) -> ActivationSource:
    """``source`` itself, or a :class:`TensorSource` over a tensor or an ``(x, y)`` pair of tensors."""
    if isinstance(source, Tensor):
        return TensorSource(source, batch_size=batch_size, rank=rank, world_size=world_size)
    if isinstance(source, tuple) and len(source) == 2 and all(isinstance(t, Tensor) for t in source):
        return TensorSource(*source, batch_size=batch_size, rank=rank, world_size=world_size)
    if not all(hasattr(source, a) for a in ("__iter__", "state_dict", "load_state_dict")):
        raise TypeError(f"the trainer reads activations from a tensor [rows, d], an (x, y) pair of tensors (a "
                        f"transcoder) or an ActivationSource; got {type(source).__name__}")
    return source


def check_sizes(saes: dict[str, SparseCoder], source: ActivationSource, hookpoints: dict[str, str] | None) -> None:
    """Raise unless every SAE's input and output widths are those of the activations it reads."""
    if hookpoints is not None:
        missing = sorted(set(saes) - set(hookpoints))
        if missing:
            raise ValueError(f"no hook point given for SAE(s) {missing}")
        dims = getattr(source, "all_dims", source.dims)  # every rank checks every SAE, owned or not
        out_dims = getattr(source, "all_out_dims", dims)  # a transcoder's target width
    for name, sae in saes.items():
        d_in, d_out = (dims[hookpoints[name]], out_dims[hookpoints[name]]) if hookpoints else (source.d_in,
                                                                                              source.d_out)
        if sae.d_in != d_in or sae.d_out != d_out:
            where = f" at {hookpoints[name]}" if hookpoints else ""
            raise ValueError(
                f"SAE {name!r} expects d_in={sae.d_in}, d_out={sae.d_out} but the activations{where} have "
                f"d_in={d_in}, d_out={d_out}"
            )


def planned_steps(cfg: TrainConfig) -> int:
    """The run's length in steps: ``train.steps``, else ``train.max_tokens`` in batches."""
    return cfg.steps if cfg.steps > 0 else cfg.max_tokens // cfg.batch_size


def exact_sae_config(sae_cfg: Any, deterministic: bool) -> Any:
    """``sae_cfg`` as trained: in exact mode (``train.deterministic``) auto precision means fp32
    whatever the hardware."""
    if deterministic and getattr(sae_cfg, "selection_dtype", None) == "auto":
        return dataclasses.replace(sae_cfg, selection_dtype="float32")
    return sae_cfg


def run_identity(cfg: TrainConfig, saes: dict[str, SparseCoder], source: ActivationSource, strategy,
                 hookpoints: dict[str, str] | None = None) -> dict[str, Any]:
    """What a resume into ``cfg.out_dir`` must match (:mod:`sae.train.run_dir`): every SAE (of every
    rank), hook points, batch size, processes, strategy and the data source's identity."""
    return {
        "saes": {name: {"architecture": sae.architecture, "d_in": sae.d_in, "d_out": sae.d_out,
                        "num_latents": sae.num_latents,
                        "sae": dataclasses.asdict(exact_sae_config(sae.cfg, cfg.deterministic))}
                 for name, sae in saes.items()},
        "hookpoints": hookpoints, "batch_size": cfg.batch_size, "world_size": dist.world_size(),
        "strategy": strategy.name, "data": source_identity(source),
    }


class Trainer:
    """Trains ``saes`` on ``source`` (an ActivationSource, or a tensor / (x, y) pair of tensors).

    It is handed its collaborators, each with a default: the ``strategy`` (what is communicated
    between ranks; :mod:`sae.train.strategy`), the ``checkpointing`` (where checkpoints and final
    weights go; :class:`~sae.train.checkpointing.Checkpointing` of ``cfg.out_dir``), the ``logger``
    and an ``evaluator`` called as ``evaluator(trainer)`` after every step (e.g.
    :class:`sae.eval.quick.PeriodicEval`). ``fit()`` asks the checkpointing to claim its folder first
    (:mod:`sae.train.run_dir`) unless the caller already did: one run at a time, and a resume only of
    the same run (a finished or different run there is an error; ``resume=False`` moves it aside).
    ``step_hooks`` are called after the evaluator (progress marks, fault-injection tests). Note that
    ``fit()`` runs the data-dependent initialisation (b_dec, encoder scale, thresholds) on the first
    batch; calling ``train_step`` directly skips it unless ``init_from_data`` is called first.
    """

    def __init__(self, cfg: TrainConfig, saes: dict[str, SparseCoder], source: ActivationSource, *,
                 strategy: SingleProcess | None = None, device: torch.device | None = None,
                 hookpoints: dict[str, str] | None = None, logger: MetricLogger | None = None,
                 checkpointing: Checkpointing | None = None, evaluator: Callable[[Trainer], None] | None = None,
                 objective: EndToEnd | None = None):
        """``hookpoints`` maps each SAE name to its hook point when ``source`` yields
        ``{hook point: Batch}`` (several hook points, one SAE each); without it every SAE trains on
        the same ``Batch``. SAEs fine-tuned from ``cfg.init_from`` keep their decoder bias and
        thresholds; others get a data-dependent init from the first batch. ``objective``: the
        end-to-end loss (``cfg.loss`` kl, ce or kl+mse; :mod:`sae.train.end_to_end`), whose
        :class:`~sae.train.end_to_end.ContextSource` is then ``source``."""
        validate_train_config(cfg)
        if not saes:
            raise ValueError("no SAE to train")
        if objective is None and cfg.loss != "mse":
            raise ValueError(f"train.loss={cfg.loss} splices the SAE into the model: pass Trainer(objective="
                             "sae.train.end_to_end.EndToEnd(...)) (sae-train builds it for data=live)")
        if objective is not None and objective.loss != cfg.loss:
            raise ValueError(f"the objective trains with loss {objective.loss!r} but train.loss={cfg.loss}")
        if objective is not None and (hookpoints is not None or (strategy is not None and strategy.name not in
                                                                  ("none", "data"))):
            raise ValueError(f"train.loss={cfg.loss} trains one hook point's SAEs on one process or data-parallel; "
                             "not with data.hookpoints or train.parallel=latent/sae")
        self.objective = objective
        self.strategy = strategy or SingleProcess()
        source = as_source(source, cfg.batch_size, *self.strategy.data_split())
        self.cfg, self.source = cfg, source
        self.data_init = not cfg.init_from  # pretrained SAEs keep their b_dec and thresholds
        self.logger = logger if logger is not None and dist.is_main() else NullLogger()
        self.checkpointing = checkpointing or Checkpointing(cfg.out_dir, keep=cfg.keep_checkpoints)
        self.evaluator = evaluator
        self.device = device or resolve_device(cfg.device)
        self.hookpoints = hookpoints
        check_sizes(saes, source, hookpoints)  # before the strategy drops other ranks' SAEs: all fail alike
        for sae in saes.values():
            sae.cfg = exact_sae_config(sae.cfg, cfg.deterministic)
        # Of every SAE, before the strategy keeps this rank's own.
        self.identity = run_identity(cfg, saes, source, self.strategy, hookpoints)
        self.saes = self.strategy.prepare({name: sae.to(self.device) for name, sae in saes.items()})
        self.total_steps = planned_steps(cfg)
        # The fused optimiser step runs where the Triton kernels do (CUDA), unless exact mode.
        self.fused_step = not cfg.deterministic and resolve_backend(self.device) is Backend.TRITON
        self.optimizers, self.schedulers, self.trackers = {}, {}, {}
        # In the trackers' unit: tokens over all data-parallel ranks.
        run_tokens = self.total_steps * self.strategy.tokens_per_step(cfg.batch_size)
        self.sparsity: dict[str, SparsityController] = {}  # the sparsity penalty's coefficient over steps
        for name, sae in self.saes.items():
            lr = cfg.lr if cfg.lr is not None else \
                default_lr(self.strategy.full_num_latents(sae)) * sae.default_lr_scale
            self.optimizers[name] = build_optimizer(sae, lr, cfg, fused_step=self.fused_step,
                                                    grad_sq_total=self.strategy.grad_sq_total(sae))
            self.schedulers[name] = build_scheduler(self.optimizers[name], self.total_steps, cfg)
            self.trackers[name] = DeadLatentTracker(sae.num_latents, resolve_dead_threshold(
                cfg.dead_tokens_threshold, run_tokens, sae.dead_window_fraction()), self.device)
            self.sparsity[name] = SparsityController(sae.target_l0, sae.cfg.sparsity_warmup_steps,
                                                     total_steps=self.total_steps)
        self.step = 0
        self.tokens = 0
        self._checkpoint_step: int | None = None  # the step of the last checkpoint written or resumed from
        self.last_metrics: dict[str, float] = {}
        self.final_dirs: dict[str, Path] = {}
        self.step_hooks: list = []  # called as hook(trainer) after each step and the evaluator
        self.finite = NonFiniteWatch()  # NaN/Inf in batches: at once on a CPU, at log steps on a GPU
        # The source's position after the last batch trained on, when a DeviceFeed reads ahead.
        self._source_state: dict[str, Any] | None = None
        self.feed_threaded: bool | None = None  # DeviceFeed's thread: None = on CUDA only
        self.graphed = GraphedSteps()  # each SAE's CUDA graph, or why its steps run eagerly

    # --- public ---------------------------------------------------------------------------
    @property
    def out_dir(self) -> Path:
        return self.checkpointing.out_dir

    def fit(self) -> dict[str, float]:
        """Train to the budget (resuming an interrupted run of the same identity); return the last metrics.

        Claims the run folder through the checkpointing unless the caller has, and then releases it."""
        owner = not self.checkpointing.claimed
        self.checkpointing.claim(self.identity, resume=self.cfg.resume, total_steps=self.total_steps)
        try:
            return self._fit()
        finally:
            if owner:
                self.checkpointing.release()

    def _fit(self) -> dict[str, float]:
        if self.cfg.resume:
            self.maybe_resume()
        # End-to-end steps read token ids, which the model's device takes as they are.
        depth = 0 if self.objective is not None else self.cfg.prefetch_to_device
        batches = iter(DeviceFeed(self.source, self.device, depth, threaded=self.feed_threaded))
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.cfg.progress and dist.is_main()),
                   unit="step", dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                try:
                    batch, self._source_state, _ = next(batches)  # None: the source itself is current
                except StopIteration:
                    log.warning("activation source exhausted after %d steps", self.step)
                    break
                if self.objective is not None:  # the clean forward: rows and next-token targets
                    batch = self.objective.prepare(batch, self.cfg.grad_accum_steps,
                                                   data_parallel=self.strategy.name == "data")
                if self.step == 0 and self.data_init:
                    self.init_from_data(batch)
                metrics = self.train_step(batch)
                bar.update(1)
                if metrics and len(self.saes) == 1:
                    bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in metrics.items()
                                     if k.startswith(("train/fvu", "train/l0"))})
                if self.evaluator is not None:
                    self.evaluator(self)
                for hook in self.step_hooks:
                    hook(self)
                if self.cfg.checkpoint_every > 0 and self.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            batches.close()  # stops a DeviceFeed's thread
        if self._checkpoint_step != self.step:
            self.save_checkpoint()
        self.final_dirs = self.save_final()
        self.logger.close()
        return self.last_metrics

    def batch_for(self, batch: Batch | dict[str, Batch], name: str) -> Batch:
        """SAE ``name``'s part of a step's batch."""
        if isinstance(batch, dict):
            if self.hookpoints is None:
                raise TypeError("the source yields batches per hook point; pass Trainer(hookpoints=...)")
            return batch[self.hookpoints[name]]
        return batch

    def init_from_data(self, batch: Batch | dict[str, Batch]) -> None:
        """Data-dependent init (b_dec, JumpReLU thresholds) from the first batch, before the first step."""
        n = self.cfg.b_dec_init_samples
        for name, sae in self.saes.items():
            b = self.batch_for(batch, name)
            x = b.x[:n].to(self.device).float()
            y = b.y[:n].to(self.device).float() if b.y is not None else None
            self.strategy.init_from_data(sae, x, y)

    def autocast(self):
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _device_batch(self, batch: Batch, where: str) -> tuple[Tensor, Tensor | None]:
        x = batch.x.to(self.device, non_blocking=True).float()
        y = batch.y.to(self.device, non_blocking=True).float() if batch.y is not None else None
        self.finite.check(x, y, where, self.step)
        return x, y

    def train_step(self, batch: Batch | dict[str, Batch]) -> dict[str, float]:
        log_now = self.step % self.cfg.log_every == 0 or self.step == self.total_steps - 1
        metrics: dict[str, float] = {}
        on_device: dict[int, tuple[Tensor, Tensor | None]] = {}
        for name, sae in self.saes.items():
            b = self.batch_for(batch, name)
            if id(b) not in on_device:
                on_device[id(b)] = self._device_batch(b, f" at {self.hookpoints[name]}" if self.hookpoints else "")
            x, y = on_device[id(b)]
            graphed = self.graphed.step(self, name, sae, x, y) if self.objective is None else None
            if graphed is not None:
                out = [graphed]
                loss = graphed.losses["loss"].item() if log_now else math.nan
                self.schedulers[name].step()
            else:
                out, loss = self._eager_step(name, sae, x, y, log_now, b)
            if log_now:
                if not math.isfinite(loss):
                    raise FloatingPointError(f"SAE {name!r}: loss is {loss} at step {self.step}; "
                                             "lower train.lr or check the activations")
                metrics.update(self._step_metrics(name, out, loss))
        self.step += 1
        self.tokens += self._step_tokens(batch, x)
        if log_now:
            self.finite.raise_if_seen(self.step)
            for tracker in self.trackers.values():
                tracker.refresh_bound()
            metrics = self.strategy.gather_metrics(metrics)
            metrics["train/tokens"] = float(self.tokens)
            self.logger.log(metrics, self.step)
            self.last_metrics = metrics
        return metrics

    def _step_tokens(self, batch: Any, x: Tensor) -> int:
        """The step's tokens over every data-parallel rank (an end-to-end step counts them exactly)."""
        return batch.tokens if self.objective is not None else self.strategy.tokens_per_step(x.shape[0])

    def _eager_step(self, name: str, sae: SparseCoder, x: Tensor, y: Tensor | None, log_now: bool, b=None):
        parts, tokens = getattr(b, "parts", None), self._step_tokens(b, x)
        out, loss = self._forward_backward(sae, self.trackers[name], x, y, log_now,
                                           self.sparsity[name].scale(self.step), parts)
        self.strategy.after_backward(sae)
        # SAEAdam projects, clips and renormalises in its own passes (build_optimizer may decline it).
        fused = getattr(self.optimizers[name], "fuses_decoder_step", False)
        if not fused:
            sae.remove_parallel_grad_()
            if self.cfg.grad_clip > 0:
                self.strategy.clip_grad_norm_(sae, self.cfg.grad_clip)
        self.optimizers[name].step()
        self.schedulers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        if not fused:
            sae.normalize_decoder_()
        self.strategy.after_step(sae)
        with torch.no_grad():
            fired = sum(self.strategy.fired_counts(sae, o) for o in out)
            self.trackers[name].update(fired, tokens)
        if self.sparsity[name].wants_l0(self.step):  # the same steps on every rank: mean_l0 all-reduces
            self.sparsity[name].observe(sum(self.strategy.mean_l0(o) for o in out) / len(out), self.step)
        return out, loss

    def _forward_backward(self, sae: SparseCoder, tracker: DeadLatentTracker, x: Tensor, y: Tensor | None,
                          need_loss: bool, sparsity_scale: float = 1.0, parts=None):
        """Forward and backward over ``grad_accum_steps`` chunks (an end-to-end step: over its
        ``parts``, chunks of its contexts); returns (outputs, loss or nan)."""
        if parts is None:
            n = self.cfg.grad_accum_steps
            chunks = list(zip(x.chunk(n), y.chunk(n) if y is not None else [None] * n, [None] * n))
        else:
            n = len(parts)
            chunks = [(x[p.rows], None if y is None else y[p.rows], p) for p in parts]
        kw: dict[str, Any] = {"dead_mask": self.strategy.step_dead_mask(tracker), "sparsity_scale": sparsity_scale}
        outs, total = [], 0.0 if need_loss else math.nan
        base_var = self.strategy.variance_fn or token_variance
        full_var = base_var(y if y is not None else x) if n > 1 else None
        for xc, yc, part in chunks:
            if n > 1:
                target = yc if yc is not None else xc
                kw["variance_fn"] = _ChunkVariance(target, full_var, base_var, y if y is not None else x)
            with self.autocast():
                out = self.strategy.forward(sae, xc, yc, **kw)
                if part is not None:
                    out = self.objective.apply(out, part)
            (out.losses["loss"] / n).backward()
            if need_loss:  # .item() synchronises a GPU: only when logging
                total += out.losses["loss"].item() / n
            outs.append(out)
        return outs, total

    # --- metrics, checkpoints -------------------------------------------------------------
    def _step_metrics(self, name: str, outs, loss: float) -> dict[str, float]:
        n = len(outs)
        m = {f"train/{k}/{name}": sum(o.losses[k].item() for o in outs if k in o.losses) / n
             for k in outs[-1].losses}
        m[f"train/loss/{name}"] = loss
        m[f"train/l0/{name}"] = sum(self.strategy.mean_l0(o) for o in outs) / n
        m[f"train/dead_fraction/{name}"] = self.strategy.dead_fraction(self.trackers[name].dead_mask)
        m[f"train/lr/{name}"] = self.optimizers[name].param_groups[0]["lr"]
        if self.sparsity[name].active:
            m[f"train/sparsity_scale/{name}"] = self.sparsity[name].scale(self.step)
        return m

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "trackers": {n: t.state_dict() for n, t in self.trackers.items()},
            "sparsity": {n: c.state_dict() for n, c in self.sparsity.items()},
            "source": self._source_state if self._source_state is not None else self.source.state_dict(),
            "rng": {"cpu": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self) -> Path:
        self.finite.raise_if_seen(self.step)  # never checkpoint weights that saw a bad batch
        path = self.checkpointing.save(self.step, self.saes, self.strategy, self.state_dict())
        self._checkpoint_step = self.step
        return path

    def maybe_resume(self) -> bool:
        """Continue from the newest checkpoint in the run folder, if any; True if there was one."""
        found = self.checkpointing.resume(self.saes, self.strategy, self.device)
        if found is None:
            return False
        ckpt, state = found
        for name in self.saes:
            self.optimizers[name].load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
            self.trackers[name].load_state_dict(state["trackers"][name])
            if name in state.get("sparsity", {}):  # absent from checkpoints of before the controller
                self.sparsity[name].load_state_dict(state["sparsity"][name])
        self.source.load_state_dict(state["source"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self._checkpoint_step = self.step
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True

    def save_final(self) -> dict[str, Path]:
        """Portable weights under ``final/`` (:meth:`Checkpointing.save_final`)."""
        return self.checkpointing.save_final(self.step, self.saes, self.strategy)
