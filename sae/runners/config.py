"""Root configs composed from each component's own dataclass, registered with Hydra.

Each component owns its config (``sae.models.config``, ``sae.train.config``,
``sae.buffer.config``); this module only composes them into the schema of each entry point,
registers the schemas in Hydra's ConfigStore, and validates a composed config in one place.
Unknown keys and wrong types are rejected by OmegaConf's struct mode against these schemas.

Programmatic use (tests, sweeps): ``compose_train_config(["sae.k=16"])``,
``compose_harvest_config(["hookpoints=[layers.2]"])``, ``compose_eval_config(["sae_path=runs/x/final/topk"])``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sae.buffer.config import DataConfig, WriterConfig
from sae.eval.config import EvalConfig
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.models.config import SAEConfig
from sae.train.config import TrainConfig
from sae.train.wandb_logger import WandbConfig

CONF_MODULE = "sae_conf"


@dataclass
class TrainRunConfig:
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Extra SAEs trained on the same batches: name -> overrides of ``sae`` (e.g. {k16: {k: 16}}).
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Weights & Biases tracking (wandb.enabled=true wandb.project=...); see sae/train/wandb_logger.py.
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class HarvestRunConfig:
    """``sae-harvest``: run ``model`` over ``text``, store ``hookpoints`` (globs allowed) via ``writer``."""

    hookpoints: list[str] = field(default_factory=lambda: ["layers.3"])
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(name="harvest_schema", node=HarvestRunConfig)
    cs.store(name="eval_schema", node=EvalConfig)


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``cfg`` that its schema dataclasses do not declare.

    Hydra's ``+key=value`` adds keys even to structured configs, and ``OmegaConf.to_object``
    then drops them silently; this finds them. Free-form dict fields (``variants``) are not
    dataclasses and are left to their own checks.
    """
    typ = OmegaConf.get_type(cfg)
    fields = {f.name for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else None
    out = []
    for key in cfg.keys():
        if fields is not None and key not in fields:
            out.append(f"{prefix}{key}")
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and fields is not None:
            out += unknown_keys(node, f"{prefix}{key}.")
    return out


def to_object(cfg: DictConfig, schema: type) -> Any:
    """Convert a composed DictConfig into its dataclass (the single conversion point).

    Raises:
        ValueError: keys the schema does not declare (e.g. added with ``+key=value``).
    """
    unknown = unknown_keys(cfg)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {schema.__name__}; check the spelling (the schema "
                         "dataclasses in sae/*/config.py list every key)")
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, schema):
        raise TypeError(f"composed config is {type(obj).__name__}, expected {schema.__name__}")
    return obj


def per_job_out_dir(cfg: DictConfig) -> None:
    """In a Hydra multirun, point ``train.out_dir`` at the job's own folder (``hydra.sweep.dir/<job
    number>``) unless the command line or the sweep sets it: jobs sharing an out_dir would resume
    each other's checkpoints. No-op outside ``@hydra.main`` and for single runs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hc = HydraConfig.get()
    if "train.out_dir" not in {o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task}:
        cfg.train.out_dir = hc.runtime.output_dir


def sae_configs(run: TrainRunConfig) -> dict[str, SAEConfig]:
    """The base SAE plus every variant, by name. Variants with unknown keys are errors."""
    fields = {f.name for f in dataclasses.fields(SAEConfig)}
    out = {run.sae.architecture: run.sae}
    for name, overrides in run.variants.items():
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"variants.{name} has unknown SAE keys {sorted(unknown)}; valid keys: {sorted(fields)}")
        typed = OmegaConf.merge(OmegaConf.structured(run.sae), overrides)
        out[name] = OmegaConf.to_object(typed)
    return out


def compose_train_config(overrides: list[str] | None = None, config_name: str = "train") -> TrainRunConfig:
    """Compose ``conf/sae_conf/<config_name>.yaml`` with Hydra overrides, outside of ``@hydra.main``."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module=CONF_MODULE, version_base=None):
        cfg = compose(config_name=config_name, overrides=overrides or [])
    return to_object(cfg, TrainRunConfig)


def compose_harvest_config(overrides: list[str] | None = None) -> HarvestRunConfig:
    """Compose ``conf/sae_conf/harvest.yaml`` with Hydra overrides, outside of ``@hydra.main``."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module=CONF_MODULE, version_base=None):
        cfg = compose(config_name="harvest", overrides=overrides or [])
    return to_object(cfg, HarvestRunConfig)


def compose_eval_config(overrides: list[str] | None = None) -> EvalConfig:
    """Compose ``conf/sae_conf/eval.yaml`` (the ``sae-eval`` schema) with overrides, outside of ``@hydra.main``."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module=CONF_MODULE, version_base=None):
        cfg = compose(config_name="eval", overrides=overrides or [])
    return to_object(cfg, EvalConfig)
