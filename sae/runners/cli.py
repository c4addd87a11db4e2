"""Command-line entry points: ``sae-harvest``, ``sae-train``, ``sae-eval`` (Hydra) and ``sae-export`` (argparse).

Each entry point composes its config from ``conf/sae_conf/`` (the package ``sae_conf``), converts it once
to its dataclass, and hands it to the stage's ``run_*`` function. An error raised by a stage is
printed as one line (``sae-train: error: ...``, the message names the problem and the fix) and the
process exits with status 1; ``SAE_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from sae.eval.config import EvalConfig, validate_eval
from sae.runners.config import HarvestRunConfig, TrainRunConfig, per_job_out_dir, register_configs, to_object

register_configs()

DEBUG_ENV = "SAE_DEBUG"


def one_line(e: BaseException) -> str:
    """An exception and its causes as one line: Hydra's multi-line texts joined, search paths and
    OmegaConf's ``full_key``/``object_type`` trailers dropped, option lists comma-separated."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).split("\nConfig search path")[0]
        out, listing = "", False
        for line in (s.strip() for s in text.splitlines()):
            if not line or line.startswith(("full_key:", "object_type=", "reference_type=", "To append", "See http")) \
                    or "$VALUE" in line or line == "None":
                continue
            out = line if not out else out + (" " if out.endswith(":") else ", " if listing else "; ") + line
            listing = listing or out.endswith(":")
        if out and not any(out in q for q in parts):
            parts.append(out)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def checks_overrides(prog: str, config_name: str) -> None:
    """Compose the command line's config once before ``@hydra.main`` runs, so that a parse error or
    a wrong value (``train.steps=abc``, ``train=smok``) prints one line instead of Hydra's report.
    Multirun (``-m``), Hydra's own flags and ``hydra.*`` overrides are left to Hydra."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = sys.argv[1:]
    if any(a.startswith("-") or a.lstrip("+~").startswith("hydra") for a in args):
        return
    try:
        with initialize_config_module(config_module="sae_conf", version_base=None):
            compose(config_name=config_name, overrides=args)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        print("(fix the command-line override named above; `--help` lists the config groups)", file=sys.stderr)
        sys.exit(2)


def reports_errors(prog: str) -> Callable:
    """Run a Hydra task so that an exception prints as ``<prog>: error: <message>`` and exits 1."""
    def wrap(task: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
        @functools.wraps(task)
        def run(cfg: DictConfig) -> None:
            try:
                task(cfg)
            except Exception as e:  # noqa: BLE001 (every stage error becomes one line; SAE_DEBUG shows all)
                if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                    raise
                print(f"{prog}: error: {e}", file=sys.stderr)
                print(f"({type(e).__name__}; set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
                sys.exit(1)
        return run
    return wrap


@hydra.main(version_base=None, config_path="pkg://sae_conf", config_name="train")
@reports_errors("sae-train")
def _train(cfg: DictConfig) -> None:
    from sae.runners.train import format_summary, run_training
    from sae.train import dist

    logging.getLogger("sae").setLevel(logging.INFO)
    per_job_out_dir(cfg)
    try:
        result = run_training(to_object(cfg, TrainRunConfig))
        if dist.is_main():
            print(format_summary(result))
        # Tear the process group down together: rank 0 evaluates alone after training, and a gloo
        # group destroyed on one rank while its peer has already exited can abort the process.
        dist.barrier()
    finally:
        dist.destroy()


def train_main() -> None:
    checks_overrides("sae-train", "train")
    _train()


@hydra.main(version_base=None, config_path="pkg://sae_conf", config_name="harvest")
@reports_errors("sae-harvest")
def _harvest(cfg: DictConfig) -> None:
    from sae.runners.harvest import format_harvest_summary, harvest_to_buffer

    logging.getLogger("sae").setLevel(logging.INFO)
    run = to_object(cfg, HarvestRunConfig)
    result = harvest_to_buffer(run.model, run.text, run.harvest, run.writer, run.hookpoints)
    print(format_harvest_summary(result))


def harvest_main() -> None:
    checks_overrides("sae-harvest", "harvest")
    _harvest()


@hydra.main(version_base=None, config_path="pkg://sae_conf", config_name="eval")
@reports_errors("sae-eval")
def _eval(cfg: DictConfig) -> None:
    from sae.runners.evaluate import run_eval, summary_line
    from sae.runners.replacement import is_replacement_folder, run_replacement_eval, summary

    logging.getLogger("sae").setLevel(logging.INFO)
    eval_cfg = to_object(cfg, EvalConfig)
    if is_replacement_folder(eval_cfg.sae_path):  # a model's transcoders, as circuit-tracer reads them
        validate_eval(eval_cfg)
        out, report = run_replacement_eval(eval_cfg)
        print(f"{summary(report)}  report: {out / 'report.md'}")
        return
    result = run_eval(eval_cfg)
    print(summary_line(result))


def eval_main() -> None:
    checks_overrides("sae-eval", "eval")
    _eval()


def export_main(argv: list[str] | None = None) -> None:
    """``sae-export`` (argparse; see ``sae-export --help`` and :mod:`sae.runners.export`)."""
    from sae.runners.export import main

    main(argv)
