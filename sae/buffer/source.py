"""The ``ActivationSource`` protocol: what the trainer and evaluator read batches from.

Implementations: the shard reader (buffer on disk), the live harvester stream, and the synthetic
toy-model source. A source is an iterable of :class:`Batch` and can save/restore its position so
training resumes on exactly the same data order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor


class Batch(NamedTuple):
    """One training batch."""

    x: Tensor
    """[B, D] input activations."""
    y: Tensor | None = None
    """[B, E] target activations for transcoders (same tokens as ``x``); None for SAEs."""


@runtime_checkable
class ActivationSource(Protocol):
    """An endless or finite stream of activation batches."""

    d_in: int
    d_out: int

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_finite(t: Tensor, what: str) -> None:
    """Raise if ``t`` holds NaN or Inf, naming the first bad row."""
    ok = torch.isfinite(t)
    if not bool(ok.all()):
        bad_rows = (~ok).any(dim=-1).nonzero().flatten()
        raise ValueError(
            f"{what} contains NaN/Inf in {bad_rows.numel()} row(s) (first: row {int(bad_rows[0])}); "
            "check the model dtype (fp16 overflow?) and the data"
        )


def source_identity(source: Any) -> dict[str, Any]:
    """What a training resume must find unchanged about ``source`` (its ``identity()``, else its type)."""
    fn = getattr(source, "identity", None)
    return fn() if callable(fn) else {"source": type(source).__name__}
