"""Blocks of rows shuffled together -> fixed-size batches, with an exact stream position.

A *block* is the unit of mixing: the shards of one reader window, or one live harvest block.
Its rows are the concatenation of its parts, emitted in the order of a seeded permutation.
Batches are consecutive slices of the stream of blocks (a batch may span two blocks), and each
batch comes with the position just after it, ``(*block.key, offset)``, from which the stream
restarts exactly. A batch is first *planned* (which rows) and later *assembled* (rows copied).
Rows of a batch are gathered in sorted order: the set of rows is what the permutation chose;
sorting groups them by part (one copy call per shard) and improves locality, and row order inside
a batch is irrelevant to the losses.
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


Plan = list[tuple[Block, Tensor]]
"""A batch before its rows are copied: (block, sorted row indices into the block) pieces."""


Alloc = Callable[[str, tuple[int, ...], torch.dtype], Tensor]
"""``alloc(name, shape, dtype)``: the tensor to gather a batch's ``x`` or ``y`` rows into."""


def assemble(plan: Plan, transform: Callable[[Batch], Batch] = lambda b: b, *, keep_dtype: bool = False,
             alloc: Alloc | None = None) -> Batch:
    """Copy a planned batch's rows out of its blocks (float32, or the stored dtype with
    ``keep_dtype``: a bfloat16 shard then costs no conversion pass on the host, and half the bytes
    of the copy to a GPU), then apply ``transform`` (in place, as the normalisers do).

    ``alloc`` gives the tensors the batch ends up in (e.g. the pinned staging buffers of a
    :class:`~sae.buffer.device_feed.DeviceFeed`, which then need no copy of their own): the rows
    are gathered straight into them, or, when they must become float32, gathered and converted
    into them in one pass. Default: fresh tensors."""
    n = sum(idx.numel() for _, idx in plan)
    first = plan[0][0]

    def gather(name: str, parts_of: Callable[[Block], list[Tensor]]) -> Tensor:
        src_dtype = parts_of(first)[0].dtype
        dtype = src_dtype if keep_dtype else torch.float32
        shape = (n, parts_of(first)[0].shape[1])
        out = alloc(name, shape, dtype) if alloc is not None else torch.empty(shape, dtype=dtype)
        staged = out if dtype == src_dtype else torch.empty(shape, dtype=src_dtype)
        at = 0
        for block, idx in plan:
            gather_rows(parts_of(block), block.starts, idx, staged[at:at + idx.numel()])
            at += idx.numel()
        if staged is not out:
            out.copy_(staged)  # the conversion to float32, written where the batch is wanted
        return out

    x = gather("x", lambda b: b.x)
    y = None if first.y is None else gather("y", lambda b: b.y)
    return transform(Batch(x, y))


def plan_batches(blocks: Iterator[tuple[Block, int]], batch_size: int) -> Iterator[tuple[Plan, Position]]:
    """Cut the stream of ``(block, first offset to emit)`` into plans of ``batch_size`` rows.

    The final plan of a finite stream may be smaller. Yields ``(plan, position after it)``.
    Planning (opening blocks: mmap, checksums, or a harvest) is the slow part and runs in the
    prefetch thread; :func:`assemble` copies the rows in the consumer's thread, which keeps
    batch memory in the consumer's allocator (fresh pages in a helper thread's malloc arena cost
    page faults on every batch) and means no buffer is ever reused under the consumer's feet.
    """
    plan: Plan = []
    have = 0
    block, i = None, 0
    for block, start in blocks:
        n, i = block.perm.numel(), start
        while i < n:
            take = min(batch_size - have, n - i)
            plan.append((block, block.perm[i:i + take].sort().values))
            have, i = have + take, i + take
            if have == batch_size:
                yield plan, (*block.key, i)
                plan, have = [], 0
    if plan and block is not None:
        yield plan, (*block.key, i)
