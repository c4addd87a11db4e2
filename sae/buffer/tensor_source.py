"""An ActivationSource over tensors in memory: the Python API's shortest path from activations to training.

``TensorSource(x)`` (an SAE) or ``TensorSource(x, y)`` (a transcoder: ``y`` is the target, row for
row) yields batches of ``batch_size`` rows in a new seeded order every epoch, dropping an
incomplete last batch; ``epochs=0`` is endless (the trainer's budget decides). Rank ``r`` of ``w``
reads every ``w``-th batch. The position (epoch, batch) is saved and restored, so training resumes
exactly. ``Trainer(cfg, saes, x)`` wraps a tensor (or an ``(x, y)`` pair) in one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import xxhash
from torch import Tensor

from .source import Batch


def _fingerprint(t: Tensor) -> str:
    data = t.detach().cpu().contiguous()
    return xxhash.xxh3_64_hexdigest(data.view(torch.uint8).numpy().tobytes()) if data.numel() else "empty"


def first_nonfinite_row(t: Tensor, chunk_rows: int = 1 << 16) -> int | None:
    """Index of the first row of ``t`` holding NaN or Inf, else None (reads ``t`` in bounded chunks)."""
    for start in range(0, t.shape[0], chunk_rows):
        bad = ~torch.isfinite(t[start:start + chunk_rows]).all(1)
        if bool(bad.any()):
            return start + int(bad.nonzero()[0, 0])
    return None


class TensorSource:
    """Shuffled batches of in-memory activations (see the module docstring).

    Raises:
        ValueError: not 2-d float tensors, ``y`` with other rows than ``x``, or fewer rows than
            one batch per rank.
    """

    def __init__(self, x: Tensor, y: Tensor | None = None, batch_size: int = 4096, *, shuffle: bool = True,
                 seed: int = 0, epochs: int = 0, rank: int = 0, world_size: int = 1):
        for name, t in (("x", x), ("y", y)):
            if t is not None and (not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point()):
                raise ValueError(f"TensorSource: {name} must be a 2-d float tensor [rows, d]; got "
                                 f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f"TensorSource: y has {y.shape[0]} rows but x has {x.shape[0]}; a transcoder's target "
                             "must hold the same tokens as its input")
        if batch_size <= 0 or x.shape[0] < batch_size * world_size:
            raise ValueError(f"TensorSource: {x.shape[0]} rows are fewer than one batch of {batch_size} per rank "
                             f"({world_size} rank(s)); lower batch_size or pass more rows")
        for name, t in (("x", x), ("y", y)):
            row = None if t is None else first_nonfinite_row(t)
            if row is not None:
                raise ValueError(f"TensorSource: {name}[{row}] holds NaN or Inf; drop or repair such rows before "
                                 f"training (e.g. keep = torch.isfinite({name}).all(1))")
        self.x, self.y = x, y
        self.d_in, self.d_out = x.shape[1], (y.shape[1] if y is not None else x.shape[1])
        self.batch_size, self.shuffle, self.seed, self.epochs = batch_size, shuffle, seed, epochs
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = x.shape[0] // batch_size
        # Every rank reads the same number of batches per epoch (a collective would otherwise wait).
        self.rounds = self.batches_per_epoch // world_size
        self.epoch, self.round = 0, 0  # next: batch round * world_size + rank of this epoch
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """What a resume must match: shapes and a content hash (xxh3) of the tensors."""
        if self._identity is None:
            self._identity = {"source": "tensor", "x": [*self.x.shape, str(self.x.dtype), _fingerprint(self.x)],
                              "y": None if self.y is None else [*self.y.shape, str(self.y.dtype), _fingerprint(self.y)],
                              "shuffle": self.shuffle, "seed": self.seed}
        return self._identity

    def _order(self, epoch: int) -> Tensor:
        n = self.batches_per_epoch * self.batch_size
        if not self.shuffle:
            return torch.arange(n)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.x.shape[0], generator=gen)[:n]

    def __iter__(self) -> Iterator[Batch]:
        while self.epochs == 0 or self.epoch < self.epochs:
            # On the tensors' device once per epoch: no host-to-device copy (and wait) per batch.
            order = self._order(self.epoch).to(self.x.device)
            while self.round < self.rounds:
                b = self.round * self.world_size + self.rank
                self.round += 1
                rows = order[b * self.batch_size:(b + 1) * self.batch_size]
                yield Batch(self.x[rows], None if self.y is None else self.y[rows.to(self.y.device)])
            self.epoch, self.round = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.round = int(state["epoch"]), int(state["round"])

    def heldout_batches(self, n_batches: int) -> list[Batch]:
        """The first ``n_batches`` batches in file order (a TensorSource has no held-out split of its
        own: pass held-out rows as their own tensor for an unbiased score)."""
        n = min(n_batches, self.batches_per_epoch)
        return [Batch(self.x[i * self.batch_size:(i + 1) * self.batch_size],
                      None if self.y is None else self.y[i * self.batch_size:(i + 1) * self.batch_size])
                for i in range(n)]
