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

from sae.config import HarvestRunConfig, TrainRunConfig, per_job_out_dir, register_configs, to_object
from sae.eval.config import EvalConfig

register_configs()

DEBUG_ENV = "SAE_DEBUG"


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
    from sae.train import dist
    from sae.train.run import format_summary, run_training

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
    _train()


@hydra.main(version_base=None, config_path="pkg://sae_conf", config_name="harvest")
@reports_errors("sae-harvest")
def _harvest(cfg: DictConfig) -> None:
    from sae.buffer.fill import format_harvest_summary, harvest_to_buffer

    logging.getLogger("sae").setLevel(logging.INFO)
    run = to_object(cfg, HarvestRunConfig)
    result = harvest_to_buffer(run.model, run.text, run.harvest, run.writer, run.hookpoints)
    print(format_harvest_summary(result))


def harvest_main() -> None:
    _harvest()


@hydra.main(version_base=None, config_path="pkg://sae_conf", config_name="eval")
@reports_errors("sae-eval")
def _eval(cfg: DictConfig) -> None:
    from sae.eval.run import run_eval, summary_line

    logging.getLogger("sae").setLevel(logging.INFO)
    result = run_eval(to_object(cfg, EvalConfig))
    print(summary_line(result))


def eval_main() -> None:
    _eval()


def export_main(argv: list[str] | None = None) -> None:
    """``sae-export`` (argparse; see ``sae-export --help`` and :mod:`sae.export.command`)."""
    from sae.export.command import main

    main(argv)
