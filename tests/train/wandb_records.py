"""Read what an offline W&B run wrote: the records of its ``run-<id>.wandb`` file.

wandb 0.31 writes offline runs as one ``.wandb`` file per run (no files/config.yaml or
wandb-summary.json until synced). The file is W&B's LevelDB-style log: a 7-byte header
(``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of records, each with a 7-byte header
(CRC32C, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) followed by a chunk of a
serialized ``wandb.proto.wandb_internal_pb2.Record``; a block tail shorter than a header is
zero padding.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


def read_records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B datastore file")
    records, buf, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left
            continue
        buf += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """The parts of an offline run the tests look at."""

    run: pb.RunRecord
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)

    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row}


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse ``<run_dir>/run-<id>.wandb`` (run_dir: ``wandb/offline-run-*``)."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    records = read_records(path)
    (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    out = OfflineRun(run_rec)
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out.config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out.summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "artifact":
            out.artifacts.append(r.artifact)
    return out
