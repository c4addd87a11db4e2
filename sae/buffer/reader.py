"""ShardReader: the ActivationSource over a harvested buffer (buffer -> train, eval).

Per epoch the training shards are shuffled with the seed; rank r of w takes every w-th shard of
that order (every row is read exactly once per epoch across ranks); each rank's shards are
grouped into windows of ``mixing_shards`` and a window's rows are emitted in a seeded random
order, cut into batches (see ``mixing``). Shards are memory-mapped (the page cache is the only
copy) and rows are gathered straight into the batch; a background thread opens, populates and
verifies windows and plans ``prefetch`` batches ahead, the consumer's thread copies the rows.

Sizes are checked on open; checksums on first use of each shard (``verify=lazy``), all at
start (``open``) or never (``none``). The position (epoch, window, offset) is the state.
"""

from __future__ import annotations

import logging
import mmap
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor

from sae.paths import inside
from sae.prefetch import prefetched

from .config import DataConfig
from .manifest import CHECKSUM, MANIFEST, activation_slot, read_manifest
from .mixing import Alloc, Block, Position, assemble, plan_batches, seeded_perm
from .normalize import Normalizer
from .source import Batch

log = logging.getLogger(__name__)
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def check_size(path: Path, entry: dict[str, Any], size: int | None = None) -> None:
    """Raise ``ValueError`` naming ``path`` if it is missing or its size differs from the manifest's."""
    if size is None:
        try:
            size = path.stat().st_size
        except FileNotFoundError as e:
            raise ValueError(f"shard {path} listed in the manifest is missing; re-harvest the buffer") from e
    if size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "longer than written"
        raise ValueError(f"shard {path} is {what}: {size} bytes, the manifest says {entry['bytes']}; "
                         "re-harvest the buffer (writer.overwrite=true)")


def map_shard(path: Path, entry: dict[str, Any], verify: bool) -> Tensor:
    """Memory-map the activations [N, D] of one shard file, checking size (and checksum).

    The mapping is populated up front (MAP_POPULATE): the rows are all about to be read.

    Raises:
        ValueError: the file is missing, truncated, has the wrong size, fails its checksum or
            (when verifying) holds NaN/Inf; the message names the file.
    """
    check_size(path, entry)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        check_size(path, entry, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    if verify and xxhash.xxh3_64_hexdigest(mm) != entry[CHECKSUM]:
        raise ValueError(f"shard {path} is corrupt: its {CHECKSUM} checksum differs from the manifest's; "
                         "re-harvest the buffer (writer.overwrite=true)")
    offset, dtype, shape = activation_slot(path)
    arr = np.frombuffer(mm, dtype=_NUMPY[dtype], count=shape[0] * shape[1], offset=offset)
    with warnings.catch_warnings():  # read-only mapping; the reader never writes to it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    t = t.view(dtype).view(shape)
    # With the checksum pass, while the pages are hot: a sum is finite when every value is (a huge
    # but finite shard that overflows it only costs the row scan below); only then find the rows.
    if verify and not bool(torch.isfinite(t.sum())):
        bad = ~torch.isfinite(t).all(dim=1)
        if bool(bad.any()):
            raise ValueError(f"shard {path} (hook point {entry['path'].split('/')[0]}) holds NaN/Inf in "
                             f"{int(bad.sum())} row(s) (first: row {int(bad.nonzero()[0])}); re-harvest it "
                             "(writer.overwrite=true), with model.dtype=float32 or bfloat16 if float16 overflowed")
    return t


class ShardReader:
    """Shuffled, rank-split, prefetched batches from a buffer folder.

    Args:
        path: buffer folder (``writer.out_dir`` of the harvest).
        batch_size: rows per batch (the trainer's batch size).
        hookpoint: input hook point; "" picks the buffer's only one.
        target_hookpoint: transcoder target hook point ("" for SAEs).
        epochs: passes over the training shards; 0 is endless.
        heldout_shards: the last N shards (harvest order) are kept out of training.
        verify: lazy | open | none (see module docstring).
        normalize: none | scale | center_scale, with the manifest's statistics.
    """

    def __init__(self, path: str | Path, batch_size: int, *, hookpoint: str = "", target_hookpoint: str = "",
                 seed: int = 0, mixing_shards: int = 4, epochs: int = 0, heldout_shards: int = 1,
                 verify: str = "lazy", normalize: str = "none", prefetch: int = 4, rank: int = 0,
                 world_size: int = 1):
        if batch_size <= 0 or mixing_shards <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, mixing_shards={mixing_shards}, rank={rank}, "
                             f"world_size={world_size}: need positive sizes and 0 <= rank < world_size")
        self.folder = Path(path)
        self.manifest = m = read_manifest(self.folder)
        if not m["complete"]:
            log.warning("buffer %s is incomplete (harvest still running or interrupted); reading its %d complete "
                        "shards", self.folder, len(m["shards"]))
        self.hookpoint = self._pick(hookpoint or self._only_hookpoint(), "hookpoint")
        self.target_hookpoint = self._pick(target_hookpoint, "target_hookpoint") if target_hookpoint else ""
        self.d_in = int(m["hookpoints"][self.hookpoint]["d"])
        self.d_out = int(m["hookpoints"][self.target_hookpoint]["d"]) if self.target_hookpoint else self.d_in
        n = len(m["shards"])
        if heldout_shards >= n or n - heldout_shards < world_size:
            raise ValueError(f"buffer {self.folder} has {n} shard(s): too few for heldout_shards={heldout_shards} "
                             f"plus one training shard per rank (world size {world_size}); harvest more tokens or a "
                             "smaller writer.shard_tokens, or lower data.buffer.heldout_shards")
        if epochs > 0 and world_size > 1 and (n - heldout_shards) % world_size:
            # Ranks would get different numbers of batches and a collective would wait forever.
            raise ValueError(f"data.buffer.epochs={epochs} with {n - heldout_shards} training shards over "
                             f"{world_size} ranks gives ranks unequal epochs; use data.buffer.epochs=0 (the "
                             "trainer's budget decides) or a heldout_shards that leaves a multiple of the world size")
        self.train_shards = list(range(n - heldout_shards))
        self.heldout_shards = list(range(n - heldout_shards, n))
        self.batch_size, self.seed, self.mixing_shards, self.epochs = batch_size, seed, mixing_shards, epochs
        self.prefetch, self.rank, self.world_size = prefetch, rank, world_size
        self.verify = verify
        self._verified: set[Path] = set()
        for s in range(n):  # sizes now (cheap), so a truncated shard fails before training starts
            for hp in self._hookpoints():
                if verify == "open":
                    self._open(s, hp)
                else:
                    check_size(*self._shard_file(s, hp))
        norms = {hp: Normalizer.from_sums(normalize, m["stats"].get(hp), f"{self.folder}:{hp}")
                 for hp in self._hookpoints()}
        self.x_norm, self.y_norm = norms[self.hookpoint], norms.get(self.target_hookpoint)
        self.position: Position = (0, 0, 0)  # (epoch, window, offset in window): next row to read

    def identity(self) -> dict[str, Any]:
        """What a resume must match (see sae.train.run_dir): the buffer and what was harvested into it."""
        m = self.manifest
        return {"source": "buffer", "path": str(self.folder.resolve()), "hookpoint": self.hookpoint,
                "target_hookpoint": self.target_hookpoint, "normalize": self.x_norm.mode, "model": m.get("model"),
                "dataset": m.get("dataset"), "text": m.get("text")}

    @classmethod
    def from_config(cls, data: DataConfig, batch_size: int, *, rank: int = 0, world_size: int = 1) -> ShardReader:
        b = data.buffer
        return cls(b.path, batch_size, hookpoint=data.hookpoint, target_hookpoint=data.target_hookpoint,
                   seed=data.seed, mixing_shards=b.mixing_shards, epochs=b.epochs, heldout_shards=b.heldout_shards,
                   verify=b.verify, normalize=data.normalize, prefetch=data.prefetch_batches, rank=rank,
                   world_size=world_size)

    # --- layout -----------------------------------------------------------------------------
    def _only_hookpoint(self) -> str:
        order = self.manifest["hookpoint_order"]
        if len(order) != 1:
            raise ValueError(f"buffer {self.folder} holds hook points {order}; choose one with data.hookpoint")
        return order[0]

    def _pick(self, name: str, field: str) -> str:
        if name not in self.manifest["hookpoints"]:
            raise ValueError(f"data.{field}={name!r} is not in buffer {self.folder}; it holds "
                             f"{self.manifest['hookpoint_order']}")
        return name

    def _hookpoints(self) -> list[str]:
        return [self.hookpoint] + ([self.target_hookpoint] if self.target_hookpoint else [])

    def _shard_file(self, shard: int, hookpoint: str) -> tuple[Path, dict[str, Any]]:
        """(path, manifest entry) of one shard file; the path is refused unless inside the buffer."""
        entry = self.manifest["shards"][shard]["files"][hookpoint]
        what = f"{self.folder / MANIFEST} shards[{shard}].files.{hookpoint}.path"
        return inside(self.folder, entry["path"], what), entry

    def _open(self, shard: int, hookpoint: str) -> Tensor:
        path, entry = self._shard_file(shard, hookpoint)
        verify = self.verify != "none"
        t = map_shard(path, entry, verify=verify and path not in self._verified)
        if verify:
            self._verified.add(path)
        return t

    @property
    def normalization(self) -> dict[str, Any]:
        """What the SAE's cfg.json records about the input (and target) normalisation."""
        out = {"x": self.x_norm.as_dict()}
        if self.y_norm is not None:
            out["y"] = self.y_norm.as_dict()
        return out

    def windows(self, epoch: int) -> list[list[int]]:
        """This rank's shards in epoch ``epoch``, grouped into mixing windows."""
        order = seeded_perm(len(self.train_shards), self.seed, epoch)
        mine = [self.train_shards[i] for i in order[self.rank::self.world_size].tolist()]
        return [mine[i:i + self.mixing_shards] for i in range(0, len(mine), self.mixing_shards)]

    # --- stream -------------------------------------------------------------------------------
    def _blocks(self, start: Position) -> Iterator[tuple[Block, int]]:
        epoch, window, offset = start
        while self.epochs == 0 or epoch < self.epochs:
            plan = self.windows(epoch)
            for w in range(window, len(plan)):
                xs = [self._open(s, self.hookpoint) for s in plan[w]]
                ys = [self._open(s, self.target_hookpoint) for s in plan[w]] if self.target_hookpoint else None
                n = sum(x.shape[0] for x in xs)
                perm = seeded_perm(n, self.seed, epoch, self.rank, w)
                yield Block((epoch, w), xs, ys, perm), offset
                offset = 0
            epoch, window = epoch + 1, 0

    def _normalize(self, batch: Batch) -> Batch:
        return Batch(self.x_norm(batch.x), None if batch.y is None else self.y_norm(batch.y))

    def __iter__(self) -> Iterator[Batch]:
        """Training batches: float32, or the shards' own dtype when nothing is normalised (the
        trainer converts on its device)."""
        return self.iter_into(None)

    def iter_into(self, alloc: Alloc | None) -> Iterator[Batch]:
        """As ``iter``, gathering each batch's rows into ``alloc``'s tensors (see ``assemble``)."""
        start = self.position
        raw = self.x_norm.mode == "none" and (self.y_norm is None or self.y_norm.mode == "none")
        for plan, end in prefetched(lambda: plan_batches(self._blocks(start), self.batch_size), self.prefetch):
            batch = assemble(plan, self._normalize, keep_dtype=raw, alloc=alloc)
            self.position = end
            yield batch

    def state_dict(self) -> dict[str, Any]:
        epoch, window, offset = self.position
        return {"epoch": epoch, "window": window, "offset": offset, "seed": self.seed,
                "train_shards": len(self.train_shards), "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. Raises ValueError if the state belongs to another buffer layout."""
        mine = (self.seed, len(self.train_shards), self.world_size)
        theirs = (state.get("seed"), state.get("train_shards"), state.get("world_size"))
        if theirs != mine:
            raise ValueError(f"reader state (seed, training shards, world size) = {theirs} does not match this "
                             f"reader's {mine}; resume with the same buffer, seed and world size")
        self.position = (int(state["epoch"]), int(state["window"]), int(state["offset"]))

    # --- evaluation ---------------------------------------------------------------------------
    def heldout_batches(self, n_batches: int) -> list[Batch]:
        """Up to ``n_batches`` batches from the held-out shards, in harvest order (no shuffle)."""
        shards = self.heldout_shards
        if not shards:
            log.warning("buffer %s has no held-out shards; evaluating on training shards", self.folder)
            shards = self.train_shards

        def blocks() -> Iterator[tuple[Block, int]]:
            for s in shards:
                xs = [self._open(s, self.hookpoint)]
                ys = [self._open(s, self.target_hookpoint)] if self.target_hookpoint else None
                yield Block((s,), xs, ys, torch.arange(xs[0].shape[0])), 0

        out = []
        for plan, _ in plan_batches(blocks(), self.batch_size):
            out.append(assemble(plan, self._normalize))
            if len(out) == n_batches:
                break
        return out
