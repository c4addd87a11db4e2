"""NaN/Inf in training batches, found without making the host wait for the GPU.

A batch on the CPU is checked at once (:func:`sae.buffer.source.check_finite` names the first bad
row). A batch on a GPU only sets a flag on the device, in place (a CUDA graph's replay sets the
same flag); the trainer reads it at log steps and before every checkpoint, so no checkpoint holds
weights that saw a bad batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.buffer.source import check_finite


class NonFiniteWatch:
    """Whether a batch since the last :meth:`raise_if_seen` held NaN/Inf."""

    def __init__(self) -> None:
        self.flag: Tensor | None = None  # on the device: any bad batch since ``since``
        self.since = 0

    def check(self, x: Tensor, y: Tensor | None, where: str, step: int) -> None:
        """Check a batch now (CPU) or flag it for later (any other device)."""
        if x.device.type == "cpu":
            check_finite(x, f"activation batch{where} at step {step}")
            if y is not None:
                check_finite(y, f"target batch{where} at step {step}")
        else:  # reading a flag every step would make the host wait for the GPU: read it at log steps
            self.flag_batch(x, y)

    def flag_batch(self, x: Tensor, y: Tensor | None) -> None:
        """Record on the device (in place, no host sync) whether ``x`` or ``y`` holds NaN/Inf."""
        if self.flag is None:
            self.flag = torch.zeros((), dtype=torch.bool, device=x.device)
        self.flag.logical_or_(~torch.isfinite(x).all())
        if y is not None:
            self.flag.logical_or_(~torch.isfinite(y).all())

    def raise_if_seen(self, step: int) -> None:
        """Raise if a flagged batch since the last call held NaN/Inf (a host sync)."""
        if self.flag is not None and bool(self.flag):
            raise ValueError(
                f"an activation batch between steps {self.since} and {step} contains NaN/Inf; "
                "check the model dtype (fp16 overflow?) and the data")
        self.since = step
