"""Hydra configs: composition, validation, resolved config next to outputs."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from sae.runners.config import TrainRunConfig, compose_train_config, sae_configs


def test_default_composes_to_dataclasses():
    cfg = compose_train_config()
    assert isinstance(cfg, TrainRunConfig)
    assert cfg.sae.architecture == "topk" and cfg.sae.k == 32


@pytest.mark.parametrize("group", ["topk", "batchtopk", "relu", "jumprelu"])
def test_every_sae_group_composes(group):
    assert compose_train_config([f"sae={group}"]).sae.architecture == group


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_train_config(["sae.kk=3"])
    assert "kk" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_is_rejected():
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_train_config(["sae.k=many"])
    assert "many" in str(err.value) + str(err.value.__cause__)


def test_variants_extend_the_base_sae():
    cfg = compose_train_config(["+variants={k16: {k: 16}, wide: {expansion_factor: 32}}"])
    cfgs = sae_configs(cfg)
    assert set(cfgs) == {"topk", "k16", "wide"}
    assert cfgs["k16"].k == 16 and cfgs["wide"].expansion_factor == 32 and cfgs["wide"].k == 32


def test_variant_with_unknown_key_is_an_error():
    cfg = compose_train_config(["+variants={bad: {kay: 16}}"])
    with pytest.raises(ValueError, match="kay"):
        sae_configs(cfg)
