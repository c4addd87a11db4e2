"""Command-line entry points (Hydra): ``sae-train`` (more stages register here as they land).

Each entry point composes its config from ``conf/`` (installed as ``sae_conf``), converts it once
to its dataclass, and hands it to the stage's ``run_*`` function.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from sae.config import TrainRunConfig, register_configs, to_object

register_configs()


@hydra.main(version_base=None, config_path="pkg://sae_conf", config_name="train")
def _train(cfg: DictConfig) -> None:
    from sae.train.run import format_summary, run_training

    logging.getLogger("sae").setLevel(logging.INFO)
    result = run_training(to_object(cfg, TrainRunConfig))
    print(format_summary(result))


def train_main() -> None:
    _train()
