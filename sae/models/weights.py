"""Checks on an SAE's weight file, before and after it is read.

A ``cfg.json`` is trusted for nothing: its sizes are compared with the shapes in the safetensors
header (read without loading a tensor) before any SAE is built, so ``num_latents=10**12`` is an
error naming the field instead of a 256 TB allocation; and weights holding NaN or Inf are refused
naming the tensor, instead of steering to empty text or plotting NaN axes downstream.
Used by every reader (ours in ``sae.train.artifact``, the peers' formats in ``sae.export``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor


def file_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors header only (nothing is loaded).

    Raises:
        ValueError: not a readable safetensors file (the message names it).
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path} is not a readable safetensors file ({e}); the folder is damaged: export or "
                         "download it again") from None


def check_shapes(path: str | Path, expected: dict[str, tuple[int, ...]], config: str,
                 *, exact_names: bool = True) -> None:
    """Refuse a weight file whose tensors do not have the shapes its config implies.

    Args:
        path: the safetensors file.
        expected: tensor name -> shape, from the config.
        config: the config file and fields the shapes came from, for the message.
        exact_names: also refuse tensors missing from the file or not expected.

    Raises:
        ValueError: naming each differing tensor, the config's shape and the file's.
    """
    got = file_shapes(path)
    problems = [f"{k}: {list(s)} from the config, {list(got[k])} in the file"
                for k, s in expected.items() if k in got and tuple(got[k]) != tuple(s)]
    if exact_names:
        problems += [f"{k}: missing from the file" for k in expected if k not in got]
        problems += [f"{k}: in the file, not in the config's SAE" for k in got if k not in expected]
    if problems:
        raise ValueError(f"{config} does not match {path}: {'; '.join(problems)}. The config or the weights were "
                         "edited or come from different SAEs: restore the folder or export it again")


def check_finite(tensors: dict[str, Tensor], where: str | Path) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor and its counts.

    Raises:
        ValueError: a floating-point tensor holds a non-finite value.
    """
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise ValueError(f"{where}: tensor {name!r} holds {nan} NaN and {inf} Inf of {t.numel()} values; the "
                             "weights are damaged (a diverged run, or an edited file): use an earlier checkpoint "
                             "or retrain")
