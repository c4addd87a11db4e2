"""ShardWriter: activation rows in, fixed-size checksummed shards and a current manifest out.

Rows accumulate in preallocated per-hook-point buffers (memory: one shard per hook point);
every ``shard_tokens`` rows a shard is written for each hook point (safetensors, temporary name,
fsync, rename), then the manifest is replaced atomically with the shard's size and checksum,
the running normalisation sums, and the resume point (context and rows of it already written).
A kill at any moment therefore leaves a manifest describing only complete shards.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors.torch import save as safetensors_bytes

from sae.harvest.harvester import Chunk

from .atomic import write_bytes_atomic, write_json_atomic
from .manifest import ACTIVATIONS, CHECKSUM, FORMAT, MANIFEST, STORE_DTYPES, VERSION, shard_relpath
from .normalize import activation_sums


class ShardWriter:
    """Write a buffer described by ``header`` (model, text, hook points with their ``d``, ...).

    Args:
        folder: buffer folder (created).
        header: manifest fields fixed for the whole harvest; must hold ``hookpoints``
            (name -> {"d": int, ...}) and ``hookpoint_order``.
        shard_tokens: rows per shard (the last shard of a harvest may be shorter).
        dtype: storage dtype, float32 | bfloat16 | float16.
        previous: the manifest of an interrupted harvest to continue (its shards are kept).
    """

    def __init__(self, folder: str | Path, header: dict[str, Any], shard_tokens: int, dtype: str,
                 previous: dict[str, Any] | None = None):
        if shard_tokens <= 0:
            raise ValueError(f"writer.shard_tokens={shard_tokens} must be > 0")
        if dtype not in STORE_DTYPES:
            raise ValueError(f"writer.dtype={dtype!r} must be one of {', '.join(STORE_DTYPES)}")
        self.folder = Path(folder)
        self.shard_tokens, self.dtype = shard_tokens, STORE_DTYPES[dtype]
        self.order: list[str] = list(header["hookpoint_order"])
        fresh = {"format": FORMAT, "version": VERSION, "complete": False, "checksum": CHECKSUM, "tokens": 0,
                 "shards": [], "resume": None, "stats": {}}
        self.manifest = copy.deepcopy(previous) if previous else fresh
        self.manifest.update(copy.deepcopy(header), dtype=dtype, shard_tokens=shard_tokens)
        dims = {hp: int(header["hookpoints"][hp]["d"]) for hp in self.order}
        self.bufs = {hp: torch.empty(shard_tokens, d, dtype=self.dtype) for hp, d in dims.items()}
        self.token_ids = torch.empty(shard_tokens, dtype=torch.int32)
        self.positions = torch.empty(shard_tokens, dtype=torch.int32)
        self.contexts = torch.empty(shard_tokens, dtype=torch.int64)
        self.fill = 0

    @property
    def tokens(self) -> int:
        """Rows accepted so far (written shards plus the pending partial shard)."""
        return int(self.manifest["tokens"]) + self.fill

    @property
    def resume_point(self) -> tuple[int, int] | None:
        """(context of the last written row, rows of that context already written), or None."""
        r = self.manifest["resume"]
        return None if r is None else (int(r["context"]), int(r["skip_rows"]))

    def append(self, chunk: Chunk) -> None:
        """Buffer ``chunk``'s rows, writing every shard that fills.

        Raises:
            ValueError: rows that overflow the storage dtype (e.g. > 65504 in float16).
        """
        start = 0
        while start < len(chunk):
            take = min(self.shard_tokens - self.fill, len(chunk) - start)
            dst = slice(self.fill, self.fill + take)
            for hp in self.order:
                src = chunk.acts[hp][start:start + take]
                self.bufs[hp][dst] = src
                if self.dtype != torch.float32 and not bool(torch.isfinite(self.bufs[hp][dst]).all()):
                    raise ValueError(f"activations at hook point {hp!r} overflow {self.dtype} (max |x| = "
                                     f"{src.abs().max().item():.4g}); use writer.dtype=bfloat16 or float32")
            self.token_ids[dst] = chunk.token_ids[start:start + take]
            self.positions[dst] = chunk.positions[start:start + take]
            self.contexts[dst] = chunk.contexts[start:start + take]
            self.fill += take
            start += take
            if self.fill == self.shard_tokens:
                self._flush()

    def finish(self) -> dict[str, Any]:
        """Write the last partial shard and mark the manifest complete; return it."""
        if self.fill:
            self._flush()
        self.manifest["complete"] = True
        write_json_atomic(self.folder / MANIFEST, self.manifest)
        return self.manifest

    def _flush(self) -> None:
        n, index = self.fill, len(self.manifest["shards"])
        meta = {"token_ids": self.token_ids[:n], "positions": self.positions[:n], "contexts": self.contexts[:n]}
        files = {}
        for hp in self.order:
            acts = self.bufs[hp][:n]
            # One metadata key: safetensors writes metadata from a hash map, so several keys would
            # come out in varying order and break byte-identical resumes.
            info = json.dumps({"format": FORMAT, "hookpoint": hp, "shard": index}, sort_keys=True)
            data = safetensors_bytes({ACTIVATIONS: acts, **meta}, metadata={"sae_forge": info})
            rel = shard_relpath(hp, index)
            (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.folder / rel, data)
            files[hp] = {"path": rel, "bytes": len(data), CHECKSUM: xxhash.xxh3_64_hexdigest(data)}
            self._add_stats(hp, acts)
        last = int(self.contexts[n - 1])
        in_last = int((self.contexts[:n] == last).sum())
        prev = self.resume_point
        if prev is not None and prev[0] == last:  # one context spans several shards
            in_last += prev[1]
        self.manifest["shards"].append({"index": index, "tokens": n, "first_context": int(self.contexts[0]),
                                        "last_context": last, "files": files})
        self.manifest["tokens"] += n
        self.manifest["resume"] = {"context": last, "skip_rows": in_last}
        write_json_atomic(self.folder / MANIFEST, self.manifest)
        self.fill = 0

    def _add_stats(self, hp: str, acts: torch.Tensor) -> None:
        """Add the shard's normalisation sums to the running totals, once per shard, so that a
        resumed harvest adds them in the same order as an uninterrupted one."""
        new = activation_sums(acts)
        total = self.manifest["stats"].setdefault(hp, {**new, "count": 0, "sum": [0.0] * len(new["sum"]),
                                                       "sum_norm": 0.0, "sum_sq_norm": 0.0})
        total["count"] += new["count"]
        total["sum"] = [a + b for a, b in zip(total["sum"], new["sum"])]
        total["sum_norm"] += new["sum_norm"]
        total["sum_sq_norm"] += new["sum_sq_norm"]
