"""Blocks of rows shuffled together -> fixed-size batches, with an exact stream position.

A *block* is the unit of mixing: the shards of one reader window, or one live harvest block.
Its rows are the concatenation of its parts, emitted in the order of a seeded permutation.
Batches are consecutive slices of the stream of blocks (a batch may span two blocks), and each
batch comes with the position just after it, ``(*block.key, offset)``, from which the stream
restarts exactly. Rows of a batch are gathered in sorted order (the set of rows is what the
permutation chose; sorting only improves locality, and row order inside a batch is irrelevant to
the losses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import xxhash
from torch import Tensor

from .source import Batch

Position = tuple[int, ...]


def seeded_perm(n: int, *key: int) -> Tensor:
    """A random permutation of ``n`` fixed by the integers ``key`` (seed, epoch, rank, block...)."""
    seed = xxhash.xxh3_64_intdigest("/".join(map(str, key)).encode()) & (2**63 - 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@dataclass
class Block:
    key: tuple[int, ...]
    """Where this block sits in the stream (e.g. (epoch, window))."""
    x: list[Tensor]
    """Input row sources [n_j, D]; the block's rows are their concatenation."""
    y: list[Tensor] | None
    """Target row sources (transcoders), same row counts as ``x``; None for SAEs."""
    perm: Tensor
    """[sum n_j] emission order of the block's rows."""

    def __post_init__(self) -> None:
        sizes = torch.tensor([0] + [p.shape[0] for p in self.x])
        self.starts = sizes.cumsum(0)[:-1]


def gather_rows(parts: list[Tensor], starts: Tensor, idx: Tensor, out: Tensor) -> None:
    """``out[i] = concat(parts)[idx[i]]`` for sorted ``idx``, one ``index_select`` per part."""
    bounds = torch.searchsorted(idx, starts).tolist() + [idx.numel()]
    for j, part in enumerate(parts):
        a, b = bounds[j], bounds[j + 1]
        if b > a:
            torch.index_select(part, 0, idx[a:b] - starts[j], out=out[a:b])


def _assemble(pieces: list[tuple[Block, Tensor]], n: int, transform: Callable[[Batch], Batch]) -> Batch:
    first = pieces[0][0]
    x = torch.empty(n, first.x[0].shape[1], dtype=first.x[0].dtype)
    y = None if first.y is None else torch.empty(n, first.y[0].shape[1], dtype=first.y[0].dtype)
    at = 0
    for block, idx in pieces:
        idx = idx.sort().values
        gather_rows(block.x, block.starts, idx, x[at:at + idx.numel()])
        if y is not None:
            gather_rows(block.y, block.starts, idx, y[at:at + idx.numel()])
        at += idx.numel()
    return transform(Batch(x.float(), None if y is None else y.float()))


def batches_from_blocks(blocks: Iterator[tuple[Block, int]], batch_size: int,
                        transform: Callable[[Batch], Batch] = lambda b: b) -> Iterator[tuple[Batch, Position]]:
    """Cut the stream of ``(block, first offset to emit)`` into batches of ``batch_size`` rows.

    The final batch of a finite stream may be smaller. Yields ``(batch, position after it)``.
    """
    pieces: list[tuple[Block, Tensor]] = []
    have = 0
    block, i = None, 0
    for block, start in blocks:
        n, i = block.perm.numel(), start
        while i < n:
            take = min(batch_size - have, n - i)
            pieces.append((block, block.perm[i:i + take]))
            have, i = have + take, i + take
            if have == batch_size:
                yield _assemble(pieces, have, transform), (*block.key, i)
                pieces, have = [], 0
    if pieces and block is not None:
        yield _assemble(pieces, have, transform), (*block.key, i)
