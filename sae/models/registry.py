"""Architectures by name: ``register("topk")`` on the class, ``build_sae(cfg, d_in)`` to make one.

The registry imports no family (each family imports it to register): the package
(:mod:`sae.models`, always imported before any of its modules) imports every family once."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from .config import SAEConfig

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.architecture = name
        # The plain family it is at inference, which export formats map: its own name unless the
        # class body says otherwise (Matryoshka TopK / BatchTopK are TopK / BatchTopK there).
        cls.export_form = cls.__dict__.get("export_form", name)
        return cls

    return deco


def architectures() -> list[str]:
    return sorted(_REGISTRY)


def sae_class(name: str) -> type:
    names = architectures()
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(names)}")
    return _REGISTRY[name]


def build_sae(cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
    """Instantiate the architecture named by ``cfg.architecture``.

    Raises:
        ValueError: unknown architecture or inconsistent sizes.
    """
    for f in dataclasses.fields(cfg):  # one place for every family: NaN/Inf pass every range check
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"sae.{f.name}={value} must be a finite number; set it to a real value "
                             "(see conf/sae_conf/sae/<architecture>.yaml for the defaults)")
    return sae_class(cfg.architecture)(cfg, d_in, d_out, seed=seed)
