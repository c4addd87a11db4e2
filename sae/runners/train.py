"""Build and run a training job from a composed :class:`sae.runners.config.TrainRunConfig`.

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
from sae.eval.quick import PeriodicEval, batches_of, evaluate_batches
from sae.models import build_sae
from sae.models.registry import sae_class
from sae.runners.config import TrainRunConfig, sae_configs
from sae.train import dist
from sae.train.checkpoint import latest_checkpoint
from sae.train.checkpointing import Checkpointing
from sae.train.logger import JsonlLogger, MultiLogger, StdoutLogger
from sae.train.shards import consolidate_sae
from sae.train.strategy import build_strategy
from sae.train.trainer import Trainer, check_sizes, planned_steps, run_identity, validate_train_config
from sae.train.wandb_logger import WandbLogger, all_frequencies, density_hook, validate_wandb

log = logging.getLogger(__name__)
LOG_FILE = "sae-train.log"  # rank 0's log lines (module "sae" and below), beside metrics.jsonl


@dataclass
class RunResult:
    out_dir: Path
    final_dirs: dict[str, Path]
    train_metrics: dict[str, float]
    eval_metrics: dict[str, dict[str, float]]
    reports: dict[str, Any] = dataclasses.field(default_factory=dict)
    """SAE name -> ``sae.runners.evaluate.EvalResult`` of the full evaluation (``train.final_report``)."""


def build_source(data: DataConfig, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 loss: str = "mse") -> ActivationSource:
    """The activation source of ``data``; for an end-to-end ``loss`` (train.loss kl, ce, kl+mse)
    the live stream of whole contexts (:class:`sae.train.end_to_end.ContextSource`)."""
    validate_data(data)
    if loss != "mse":
        if data.source != "live":
            raise ValueError(f"train.loss={loss} splices the SAE into the model's forward, so it reads text, not "
                             f"stored activations: use data=live (data.live.model=..., data.hookpoint=...), not "
                             f"data.source={data.source}")
        from sae.train.end_to_end import ContextSource

        return ContextSource(data.live, batch_size, hookpoint=data.hookpoint, target_hookpoint=data.target_hookpoint,
                             seed=data.seed, normalize=data.normalize, rank=rank, world_size=world_size, loss=loss)
    if data.source == "synthetic":
        return SyntheticSource(data.synthetic, batch_size, rank=rank, world_size=world_size)
    if data.source == "buffer":
        from sae.buffer.reader import ShardReader

        return ShardReader.from_config(data, batch_size, rank=rank, world_size=world_size)
    from sae.buffer.live import LiveSource

    return LiveSource.from_config(data, batch_size, rank=rank, world_size=world_size)


def hookpoint_saes(cfg_names: list[str], hookpoints: list[str]) -> dict[str, tuple[str, str]]:
    """``data.hookpoints``: one SAE per configured SAE and hook point, named ``<sae>@<hook point>``
    -> (config name, hook point)."""
    return {f"{n}@{hp}": (n, hp) for hp in hookpoints for n in cfg_names}


def hookpoints_needed(strategy, hookpoint_of: dict[str, str], order: list[str]) -> list[list[str]]:
    """Per rank, the hook points of the SAEs that ``strategy`` places on it (SAE parallel)."""
    names = list(hookpoint_of)
    out: list[list[str]] = [[] for _ in range(dist.world_size())]
    for name, hp in hookpoint_of.items():
        r = strategy.owner(names, name)
        if hp not in out[r]:
            out[r].append(hp)
    return [sorted(hps, key=order.index) for hps in out]


def build_hookpoint_source(run: TrainRunConfig, strategy, cfg_names: list[str]):
    """Source of ``{hook point: Batch}`` for ``data.hookpoints`` and the SAEs it feeds, as
    (source, {SAE name: (config name, hook point)}). Under ``train.parallel=sae`` a rank reads
    (buffer) or receives (live, after an all-to-all) only the hook points of its own SAEs."""
    from sae.train.multi_source import LiveHookpoints, ZippedSource

    data, B = run.data, run.train.batch_size
    validate_data(data)
    exchange = strategy.name == "sae" and dist.world_size() > 1
    rank, world = strategy.data_split()
    if data.source == "live":
        from sae.buffer.live import LiveSource

        if exchange:
            W = dist.world_size()
            if B % W:
                raise ValueError(f"train.batch_size={B} must be a multiple of the {W} processes: with data.hookpoints, "
                                 "data=live and train.parallel=sae every rank harvests batch_size / world rows a step")
            live = LiveSource.from_config(data, B // W, rank=dist.rank(), world_size=W)
        else:
            live = LiveSource.from_config(data, B, rank=rank, world_size=world)
        saes = hookpoint_saes(cfg_names, live.hookpoints)
        hp_of = {n: hp for n, (_, hp) in saes.items()}
        needs = hookpoints_needed(strategy, hp_of, live.hookpoints) if exchange else None
        return LiveHookpoints(live, needs), saes
    from sae.buffer.manifest import read_manifest
    from sae.buffer.reader import ShardReader

    hps = list(dict.fromkeys(data.hookpoints))
    held = read_manifest(data.buffer.path)["hookpoints"]
    missing = [hp for hp in hps + list(data.target_hookpoints) if hp not in held]
    if missing:
        raise ValueError(f"data.hookpoints / data.target_hookpoints: {missing} not in buffer {data.buffer.path}; "
                         f"it holds {list(held)}")
    target_of = {}
    if data.target_hookpoints:
        if len(data.target_hookpoints) != len(hps):
            raise ValueError(f"data.hookpoints lists {len(hps)} hook points and data.target_hookpoints "
                             f"{len(data.target_hookpoints)}; give one target per input, in the same order")
        target_of = dict(zip(hps, data.target_hookpoints))
    saes = hookpoint_saes(cfg_names, hps)
    hp_of = {n: hp for n, (_, hp) in saes.items()}
    mine = hookpoints_needed(strategy, hp_of, hps)[dist.rank()] if strategy.name == "sae" else hps
    one = dataclasses.replace(data, hookpoints=[], target_hookpoints=[])
    readers = {hp: ShardReader.from_config(dataclasses.replace(one, hookpoint=hp,
                                                               target_hookpoint=target_of.get(hp, "")),
                                           B, rank=rank, world_size=world) for hp in mine}
    return ZippedSource(readers, all_dims={hp: int(held[hp]["d"]) for hp in hps},
                        all_out_dims={hp: int(held[target_of.get(hp, hp)]["d"]) for hp in hps}), saes


def heldout_batches(source: ActivationSource, n_batches: int) -> list[Batch]:
    """Batches the trainer never sees (synthetic: indices beyond any training run; buffer: the
    held-out shards; live: the held-out contexts)."""
    if isinstance(source, SyntheticSource):
        return [source.batch(10**9 + i) for i in range(n_batches)]
    if hasattr(source, "heldout_batches"):
        return source.heldout_batches(n_batches)
    raise ValueError(f"no held-out split defined for {type(source).__name__}")


def check_checkpoint_sizes(out_dir: Path, source: ActivationSource, hookpoint_of: dict[str, str] | None = None) -> None:
    """Fail before training when ``out_dir`` holds checkpoints of SAEs of another width.

    Resuming would otherwise die deep inside ``load_state_dict`` with a shape error.
    """
    ckpt = latest_checkpoint(out_dir)
    for cfg_path in sorted(ckpt.glob("*/cfg.json")) if ckpt is not None else []:
        meta = json.loads(cfg_path.read_text())
        hp = (hookpoint_of or {}).get(cfg_path.parent.name)
        if hookpoint_of is not None and hp is None:
            raise ValueError(f"{cfg_path.parent} is not one of this run's SAEs {sorted(hookpoint_of)}; "
                             "use a fresh train.out_dir")
        want = (source.all_dims[hp], source.all_out_dims[hp]) if hp else (source.d_in, source.d_out)
        if (meta.get("d_in"), meta.get("d_out")) != want:
            where = f"hook point {hp}" if hp else describe_source(source)
            raise ValueError(
                f"{cfg_path.parent} was trained with d_in={meta.get('d_in')}, d_out={meta.get('d_out')}, but the "
                f"activations have d_in={want[0]}, d_out={want[1]} ({where}); "
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


def resolve_normalize(data: DataConfig, cfgs: dict[str, Any]) -> DataConfig:
    """``data.normalize=auto`` made concrete: ``scale`` when every SAE is a transcoder of a family
    that trains better on normalised data (all but ReLU and Gated; a CLT per layer), ``none``
    otherwise (SAEs)."""
    if data.normalize != "auto":
        return data
    transcoders = all(c.transcode and sae_class(c.architecture).normalize_transcoder_data for c in cfgs.values())
    return dataclasses.replace(data, normalize="scale" if transcoders and data.source != "synthetic" else "none")


def run_training(run: TrainRunConfig, *, heldout: int = 4) -> RunResult:
    validate_train_config(run.train)
    validate_wandb(run.wandb)
    cfgs = sae_configs(run)
    run = dataclasses.replace(run, data=resolve_normalize(run.data, cfgs))
    strategy = build_strategy(run.train.parallel)
    device = dist.init_from_env()  # None unless launched by torchrun / accelerate with WORLD_SIZE > 1
    if dist.world_size() > 1 and strategy.name == "none":
        raise ValueError(f"launched with {dist.world_size()} processes but train.parallel=none; "
                         "set train.parallel=data, latent or sae")
    torch.manual_seed(run.train.seed)
    rank, world = strategy.data_split()
    hp_of: dict[str, str] | None = None  # data.hookpoints: SAE name -> its hook point
    clt_meta: dict[str, Any] = {}
    if any(sae_class(c.architecture).cross_layer for c in cfgs.values()):  # every layer's MLP in/out, side by side
        if run.train.loss != "mse":
            raise ValueError(f"train.loss={run.train.loss} is not implemented for cross-layer transcoders (every "
                             "MLP replaced at once); train them with train.loss=mse")
        from sae.buffer.clt_source import build_clt_source, clt_configs

        source = build_clt_source(run.data, run.train.batch_size, rank=rank, world_size=world)
        cfgs, clt_meta = clt_configs(cfgs, source), {"clt": source.meta()}
    elif run.data.hookpoints:
        if run.train.loss != "mse":
            raise ValueError(f"train.loss={run.train.loss} trains the SAEs of one hook point (data.hookpoint); "
                             "data.hookpoints trains one per hook point with train.loss=mse only")
        if run.train.init_from:
            raise ValueError("train.init_from fine-tunes one published SAE; it does not combine with data.hookpoints")
        plain = [n for n, c in cfgs.items() if bool(run.data.target_hookpoints) != c.transcode]
        if plain:
            raise ValueError(f"{plain}: sae.transcode={str(not run.data.target_hookpoints).lower()} with "
                             f"data.target_hookpoints="
                             f"{list(run.data.target_hookpoints)}; a transcoder per hook point needs both "
                             "sae.transcode=true and data.target_hookpoints (its targets), an SAE per hook point "
                             "neither")
        source, by_name = build_hookpoint_source(run, strategy, list(cfgs))
        hp_of = {n: hp for n, (_, hp) in by_name.items()}
    else:
        source = build_source(run.data, run.train.batch_size, rank=rank, world_size=world, loss=run.train.loss)
    if run.train.resume:
        check_checkpoint_sizes(Path(run.train.out_dir), source, hp_of)
    # Build every SAE before writing anything, so bad sizes fail with nothing on disk.
    if run.train.init_from:
        saes = {"finetune": load_init_sae(run)}
    elif hp_of is not None:
        # Every rank builds every SAE (same seeds everywhere); the strategy keeps this rank's own.
        dims, out_dims = source.all_dims, source.all_out_dims
        saes = {name: build_sae(cfgs[c], dims[hp], out_dims[hp], seed=run.train.seed + i)
                for i, (name, (c, hp)) in enumerate(by_name.items())}
    else:
        saes = {name: build_sae(c, source.d_in, source.d_out, seed=run.train.seed + i)
                for i, (name, c) in enumerate(cfgs.items())}
    out_dir = Path(run.train.out_dir)
    data_meta = dataclasses.asdict(run.data)
    if hp_of is None and not clt_meta:  # the hook points the source resolved ("": a buffer's only one)
        for key in ("hookpoint", "target_hookpoint"):
            data_meta[key] = getattr(source, key, None) or data_meta[key]
    meta = {"data": data_meta, **clt_meta}
    meta_by_name: dict[str, dict[str, Any]] = {}
    if hp_of is not None:  # each SAE's cfg.json names its own hook point, as if trained alone
        one = dataclasses.asdict(dataclasses.replace(run.data, hookpoints=[], target_hookpoints=[]))
        target_of = getattr(source, "target_of", None) or dict(zip(run.data.hookpoints, run.data.target_hookpoints))
        meta_by_name = {n: {"data": {**one, "hookpoint": hp, "target_hookpoint": target_of.get(hp, "")},
                            "normalization": source.normalization_of(hp)}
                        for n, hp in hp_of.items() if hp in source.dims}
    elif hasattr(source, "normalization"):
        meta["normalization"] = source.normalization
    checkpointing = Checkpointing(out_dir, keep=run.train.keep_checkpoints, sae_meta=meta,
                                  sae_meta_by_name=meta_by_name)
    check_sizes(saes, source, hp_of)  # nothing written yet
    # The folder is locked and checked (same run, or none) before anything in it is written.
    checkpointing.claim(run_identity(run.train, saes, source, strategy, hp_of), resume=run.train.resume,
                        total_steps=planned_steps(run.train))
    log_file = None
    if dist.is_main():  # the run's log, in the folder it now holds (Hydra writes nothing there)
        log_file = logging.FileHandler(out_dir / LOG_FILE)
        log_file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger("sae").addHandler(log_file)
    try:
        return _train_claimed(run, saes, source, strategy, device, checkpointing, hp_of, heldout)
    except BaseException:
        if checkpointing.discard_unused():
            log.warning("the run failed before its first checkpoint: removed what it wrote in %s", out_dir)
        raise
    finally:
        checkpointing.release()
        if log_file is not None:
            logging.getLogger("sae").removeHandler(log_file)
            log_file.close()


def _train_claimed(run: TrainRunConfig, saes: dict[str, Any], source: ActivationSource, strategy, device,
                   checkpointing: Checkpointing, hp_of: dict[str, str] | None, heldout: int) -> RunResult:
    """Training, then the final evaluation, in a run folder ``checkpointing`` holds."""
    out_dir = checkpointing.out_dir
    wandb_logger, logger = None, None
    if dist.is_main():  # only rank 0 writes the config and logs
        write_resolved_config(run, out_dir)
        # The progress bar shows the live figures; log lines only when it is off.
        loggers = [JsonlLogger(out_dir / "metrics.jsonl")] + ([] if run.train.progress else [StdoutLogger()])
        if run.wandb.enabled:
            wandb_logger = WandbLogger(run.wandb, OmegaConf.to_container(OmegaConf.structured(run)), out_dir)
            loggers.append(wandb_logger)
        logger = MultiLogger(*loggers)

    def held(n_batches: int, names) -> list[Batch] | dict[str, list[Batch]]:
        """Held-out batches: one list, or per SAE name (data.hookpoints; of the hook points this rank reads)."""
        b = heldout_batches(source, n_batches)
        return {n: b[hp_of[n]] for n in names if hp_of[n] in b} if hp_of is not None else b

    evaluator = None  # the held-out batches of every SAE; each rank scores those it trains
    if run.train.eval_every > 0 and strategy.name == "sae":  # every rank scores its own SAEs; rank 0 logs all
        evaluator = PeriodicEval(held(run.train.eval_batches, saes), run.train.eval_every,
                                 gather=dist.all_gather_objects)
    elif run.train.eval_every > 0 and dist.is_main():
        if strategy.name == "latent":  # each rank holds a slice of the latents: nothing whole to score
            log.info("train.parallel=latent: no periodic held-out evaluation (the final one still runs)")
        else:
            evaluator = PeriodicEval(held(run.train.eval_batches, saes), run.train.eval_every)
    objective = None
    if run.train.loss != "mse":
        from sae.train.end_to_end import EndToEnd

        objective = EndToEnd(source, run.train.loss, run.train.mse_coefficient)
    trainer = Trainer(run.train, saes, source, strategy=strategy, device=device, hookpoints=hp_of, logger=logger,
                      checkpointing=checkpointing, evaluator=evaluator, objective=objective)
    histogram_every = run.wandb.histogram_every or run.train.eval_every
    spread = strategy.name == "sae" and dist.world_size() > 1  # every rank holds SAEs of its own
    local_hist = wandb_logger is not None and strategy.name != "latent"
    if run.wandb.enabled and histogram_every > 0 and (spread or local_hist):
        hist_batches = held(run.train.eval_batches, saes)
        trainer.step_hooks.append(density_hook(wandb_logger, hist_batches, histogram_every,
                                               gather=dist.all_gather_objects if spread else None))
    train_metrics = trainer.fit()
    final_dirs = trainer.final_dirs
    if strategy.name == "latent":  # join the shards once; rank 0 scores the full SAE
        final_dirs = {n: out_dir / "final" / n for n in trainer.saes} if dist.is_main() else {}
        full = {n: consolidate_sae(out_dir / "final" / n) for n in final_dirs}  # CLTs or TopK SAEs
    else:
        full = trainer.saes
    batches = held(heldout, full)
    eval_metrics: dict[str, dict[str, float]] = {}
    for name, sae in full.items():
        m = evaluate_batches(sae.to(trainer.device), batches_of(batches, name), trainer.device)
        if isinstance(source, SyntheticSource):
            m["feature_recovery"] = feature_recovery(source.features, sae.W_dec.cpu()).item()
        eval_metrics[name] = m
        if divergence(m):
            log.warning("%s %s", name, divergence(m))
    for part in dist.all_gather_objects((eval_metrics, {n: str(p) for n, p in final_dirs.items()})):
        eval_metrics.update(part[0])
        final_dirs.update({n: Path(p) for n, p in part[1].items()})
    final_freqs = None
    if spread and run.wandb.enabled:  # final densities of every rank's SAEs, for rank 0's W&B run
        own = all_frequencies(full, batches, trainer.device)
        final_freqs = {k: v for part in dist.all_gather_objects(own) for k, v in part.items()}
    reports = final_reports(final_dirs, str(trainer.device)) if run.train.final_report and dist.is_main() else {}
    if dist.is_main():
        summary: dict[str, Any] = {"steps": trainer.step, "tokens": trainer.tokens, "eval": eval_metrics,
                                   "final": {n: str(p) for n, p in final_dirs.items()},
                                   "reports": {n: str(r.report_json) for n, r in reports.items()},
                                   "world_size": dist.world_size(), "parallel": strategy.name}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if wandb_logger is not None:
        wandb_logger.finish(eval_metrics, final_dirs, saes=full, batches=batches, step=trainer.step,
                            frequencies=final_freqs,
                            device=trainer.device, reports={n: r.report for n, r in reports.items()})
    return RunResult(out_dir, final_dirs, train_metrics, eval_metrics, reports)


def load_init_sae(run: TrainRunConfig):
    """The published SAE named by ``train.init_from``, ready to fine-tune."""
    from sae.export import load_pretrained

    if run.variants:
        raise ValueError("train.init_from fine-tunes one published SAE; remove the variants")
    # As trained (normalised inputs), for a run that normalises its activations the same way.
    sae = load_pretrained(run.train.init_from, hookpoint=run.train.init_hookpoint or None, raw_activations=False)
    return sae.train()


def final_reports(final_dirs: dict[str, Path], device: str) -> dict[str, Any]:
    """Full evaluation (``sae-eval`` defaults) of each final SAE: report.json/html in final/<name>/eval/."""
    from sae.eval.config import EvalConfig
    from sae.runners.evaluate import run_eval

    return {name: run_eval(EvalConfig(sae_path=str(d), device=device)) for name, d in final_dirs.items()}


def divergence(m: dict[str, float]) -> str | None:
    """Why held-out metrics say a run diverged (FVU above 1, or a reconstruction norm far from the
    target's), with the likely fix; None when they look sane."""
    fvu, norm = m.get("fvu", 0.0), m.get("relative_norm", 1.0)
    if not (fvu > 1 or norm > 3 or norm < 1 / 3):
        return None
    return (f"diverged: held-out FVU {fvu:.3g} (above 1 is worse than predicting the mean), reconstruction norm "
            f"{norm:.3g}x the target's; likely fixes: lower train.lr, normalise the activations "
            "(data.normalize=scale), train longer than the warm-up, and for a transcoder leave sae.normalize_decoder "
            "unset (its decoder then starts at zero)")


def format_summary(result: RunResult) -> str:
    lines = [f"outputs: {result.out_dir}"]
    for name, m in result.eval_metrics.items():
        problem = divergence(m)
        if problem:
            lines.append(f"  WARNING {name}: {problem}")
        report = result.reports.get(name)
        if report is not None:  # the full evaluation: FVU, L0, dead %, spliced-model figure, report path
            from sae.runners.evaluate import summary_line

            extra = [f"{k}={v:.3f}" for k, v in report.report["metrics"].items() if k == "feature_recovery"]
            lines.append(f"  {name}: {summary_line(report)}" + "".join(f" {e}" for e in extra)
                         + f"\n    weights: {result.final_dirs[name]}")
            continue
        parts = [f"fvu={m['fvu']:.4f}", f"l0={m['l0']:.1f}", f"dead={100 * m['dead_fraction']:.1f}%",
                 f"cos={m['cosine']:.3f}"]
        parts += [f"{k}={v:.3f}" for k, v in m.items() if k in ("feature_recovery",)]
        lines.append(f"  {name}: " + " ".join(parts) + f"  -> {result.final_dirs[name]}")
    return "\n".join(lines)


