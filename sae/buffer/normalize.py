"""Activation normalisation from harvest statistics, applied alike at train and eval time.

Modes (``data.normalize``):
    none          x
    scale         x * sqrt(D) / E||x||                        (SAELens' norm scaling factor)
    center_scale  (x - mu) * sqrt(D / E||x - mu||^2)           E||x - mu||^2 = E||x||^2 - ||mu||^2

Both make the mean squared norm about D, so SAE hyperparameters (lr, k, l1) transfer across
models and layers. Statistics are the running sums the ShardWriter keeps in the manifest (or that
the live source takes from its held-out contexts). The SAE's cfg.json records the mode, scale and
mean so that downstream tools can apply the same map (or fold it into the weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def activation_sums(x: Tensor) -> dict[str, Any]:
    """The sufficient statistics of ``x`` [N, D] in float64, as the manifest stores them."""
    x = x.double()
    norms = x.norm(dim=1)
    return {"count": int(x.shape[0]), "sum": x.sum(0).tolist(), "sum_norm": norms.sum().item(),
            "sum_sq_norm": norms.pow(2).sum().item()}


@dataclass
class Normalizer:
    mode: str
    scale: float = 1.0
    mean: Tensor | None = None
    """[D] subtracted before scaling (center_scale only)."""

    @classmethod
    def from_sums(cls, mode: str, sums: dict[str, Any] | None, what: str) -> Normalizer:
        """Build from :func:`activation_sums`-style sums.

        Raises:
            ValueError: unknown mode, or missing/degenerate statistics for a mode that needs them.
        """
        if mode in ("none", "auto"):  # auto is resolved per run by the trainer (sae.runners.train); unresolved: none
            return cls("none")
        if mode not in ("scale", "center_scale"):
            raise ValueError(f"data.normalize={mode!r} must be none, scale or center_scale")
        if not sums or sums.get("count", 0) == 0:
            raise ValueError(f"no activation statistics for {what}; use data.normalize=none or re-harvest")
        n = sums["count"]
        mean = torch.tensor(sums["sum"], dtype=torch.float64) / n
        d = mean.numel()
        if mode == "scale":
            denom = sums["sum_norm"] / n
            out = cls("scale", math.sqrt(d) / denom if denom > 0 else 0.0)
        else:
            var = sums["sum_sq_norm"] / n - float(mean.pow(2).sum())
            out = cls("center_scale", math.sqrt(d / var) if var > 0 else 0.0, mean.float())
        if not (math.isfinite(out.scale) and out.scale > 0):
            raise ValueError(f"activations of {what} have zero spread; normalisation {mode!r} is undefined")
        return out

    def __call__(self, x: Tensor) -> Tensor:
        """Normalise ``x`` [B, D] in place (float32) and return it."""
        if self.mode == "none":
            return x
        if self.mean is not None:
            x.sub_(self.mean.to(x.device))
        return x.mul_(self.scale)

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "scale": self.scale,
                "mean": None if self.mean is None else self.mean.tolist()}


def recorded_affine(entry: dict[str, Any] | None, dim: int, what: str) -> tuple[float, Tensor] | None:
    """(scale, mean [dim] float64) of one normaliser as cfg.json records it (:meth:`Normalizer.as_dict`);
    None for the identity.

    Raises:
        ValueError: a scale that is not a positive number or a mean of the wrong size (naming ``what``).
    """
    if not entry or entry.get("mode", "none") == "none":
        return None
    scale, mean = entry.get("scale"), entry.get("mean")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"cfg.json normalization.{what}.scale={scale!r} must be a positive number; the SAE folder is "
                         "damaged")
    mu = torch.tensor(mean, dtype=torch.float64) if mean is not None else torch.zeros(dim, dtype=torch.float64)
    if mu.shape != (dim,):
        raise ValueError(f"cfg.json normalization.{what}.mean has {mu.numel()} entries, expected {dim}")
    return float(scale), mu


def per_layer_affines(layers: Any, dim: int) -> tuple[list[tuple[float, Tensor]], list[tuple[float, Tensor]]]:
    """Input and target maps (scale, mean [dim] float64) of every layer of a CLT's recorded
    ``normalization.per_layer`` (each entry ``{"x": ..., "y": ...}``); (1, 0) for the identity.

    Raises:
        ValueError: entries that are not what :attr:`ShardReader.normalization` writes (naming the entry).
    """
    if not isinstance(layers, list) or not all(isinstance(e, dict) for e in layers):
        raise ValueError("cfg.json normalization.per_layer must be a list of {x, y} normalisers; the SAE folder is "
                         "damaged or its cfg.json was edited")
    identity = (1.0, torch.zeros(dim, dtype=torch.float64))
    return ([recorded_affine(e.get("x"), dim, f"per_layer[{j}].x") or identity for j, e in enumerate(layers)],
            [recorded_affine(e.get("y"), dim, f"per_layer[{j}].y") or identity for j, e in enumerate(layers)])
