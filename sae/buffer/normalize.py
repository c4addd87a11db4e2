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
        if mode in ("none", "auto"):  # auto is resolved per run by the trainer (sae.train.run); unresolved: none
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
