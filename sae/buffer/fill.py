"""Harvest to disk: model + text -> Harvester -> ShardWriter, resumable after any interruption.

What ``sae-harvest`` runs. The harvest is deterministic (same contexts, same batches, same
order), so after a kill the run restarts at the forward batch holding the last written row,
skips the rows already in shards, and the finished buffer is byte-identical to an
uninterrupted one. A complete buffer is never replaced unless ``writer.overwrite`` is set, and
a folder lock (flock) keeps two harvests from writing the same buffer.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig, validate_harvest
from sae.harvest.harvester import Chunk, Harvester
from sae.harvest.model import LoadedModel, load_model
from sae.harvest.text import dataset_info, load_text_dataset, special_ids

from .config import WriterConfig
from .manifest import MANIFEST, identity_diff, read_manifest
from .writer import ShardWriter

log = logging.getLogger(__name__)


@dataclass
class HarvestResult:
    folder: Path
    manifest: dict[str, Any]
    new_tokens: int
    """Rows harvested by this call (less than the total when it resumed)."""
    seconds: float
    resumed: bool


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RuntimeError(f"another harvest is writing {folder}; wait for it or pick another "
                               "writer.out_dir") from e
        yield
    finally:
        os.close(fd)


def _remove_unlisted(folder: Path, manifest: dict[str, Any] | None, hookpoints: list[str]) -> None:
    """Delete shard files and temporaries that the manifest does not list (interrupted writes)."""
    listed = {f["path"] for s in (manifest or {}).get("shards", []) for f in s["files"].values()}
    for hp in hookpoints:
        for p in (folder / hp).glob("*shard_*") if (folder / hp).is_dir() else []:
            if f"{hp}/{p.name}" not in listed:
                p.unlink()


def _remove_buffer(folder: Path, manifest: dict[str, Any]) -> None:
    """Overwrite: drop the manifest first (the buffer stops being complete), then its shards."""
    (folder / MANIFEST).unlink()
    for hp in manifest.get("hookpoint_order", []):
        shutil.rmtree(folder / hp, ignore_errors=True)


def _header(lm: LoadedModel, harvester: Harvester, ds: Any, text: TextConfig, harvest: HarvestConfig,
            writer: WriterConfig) -> dict[str, Any]:
    tok = lm.tokenizer
    bos, eos, pad = special_ids(tok)
    return {
        "model": lm.info,
        "tokenizer": {"class": type(tok).__name__, "name_or_path": str(tok.name_or_path), "vocab_size": len(tok),
                      "bos_id": bos, "eos_id": eos, "pad_id": pad},
        "dataset": dataset_info(ds, text),
        "text": {"context_length": text.context_length, "prepend_bos": text.prepend_bos, "pack": text.pack},
        "harvest": {"batch_size": harvest.batch_size, "drop_special": harvest.drop_special,
                    "drop_first": harvest.drop_first},
        "max_tokens": harvest.max_tokens,
        "hookpoints": {hp.name: {"module": hp.module, "kind": hp.kind, "d": harvester.dims[hp.name]}
                       for hp in harvester.hookpoints},
        "hookpoint_order": harvester.names,
        "dtype": writer.dtype,
        "shard_tokens": writer.shard_tokens,
    }


def _skip_written(chunk: Chunk, context: int, rows: int) -> Chunk:
    """Drop rows already in shards: contexts before ``context`` and its first ``rows`` rows.

    A chunk holds whole contexts, so counting within the chunk is exact.
    """
    same = chunk.contexts == context
    before = same.cumsum(0) - 1
    return chunk.select(~((chunk.contexts < context) | (same & (before < rows))))


def _previous(folder: Path, overwrite: bool) -> dict[str, Any] | None:
    if not (folder / MANIFEST).is_file():
        return None
    manifest = read_manifest(folder)
    if manifest["complete"] and not overwrite:
        raise FileExistsError(f"{folder} already holds a complete harvest ({manifest['tokens']} tokens); "
                              "set writer.overwrite=true to replace it, or pick another writer.out_dir")
    return manifest


def harvest_to_buffer(model: ModelConfig, text: TextConfig, harvest: HarvestConfig, writer: WriterConfig,
                      hookpoints: list[str]) -> HarvestResult:
    """Harvest ``hookpoints`` into the buffer at ``writer.out_dir``, resuming an interrupted run.

    Raises:
        FileExistsError: the buffer is complete and ``writer.overwrite`` is false.
        ValueError: bad config, unknown hook point, empty dataset or missing column, NaN
            activations, or a resume whose model/text/hook points differ from the buffer's.
    """
    validate_harvest(model, text, harvest)
    folder = Path(writer.out_dir)
    previous = _previous(folder, writer.overwrite)  # fail before loading anything
    written = int(previous["tokens"]) if previous and not writer.overwrite else 0
    if harvest.max_tokens and written > harvest.max_tokens:
        raise ValueError(f"{folder} holds an unfinished harvest of {written} tokens, more than harvest.max_tokens="
                         f"{harvest.max_tokens}; rerun with harvest.max_tokens>={written} (or 0: all the text) to "
                         "finish it, or writer.overwrite=true to start over")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _folder_lock(folder):
            return _harvest_locked(folder, model, text, harvest, writer, hookpoints)
    finally:
        if created and not any(folder.iterdir()):
            folder.rmdir()


def _harvest_locked(folder: Path, model: ModelConfig, text: TextConfig, harvest: HarvestConfig,
                    writer: WriterConfig, hookpoints: list[str]) -> HarvestResult:
    previous = _previous(folder, writer.overwrite)
    if previous is not None and writer.overwrite:
        _remove_buffer(folder, previous)
        previous = None
    lm = load_model(model)
    harvester = Harvester(lm, hookpoints, text, harvest)
    ds = load_text_dataset(text)
    header = _header(lm, harvester, ds, text, harvest, writer)
    if previous is not None:
        diff = identity_diff(previous, header)
        if diff:
            raise ValueError(f"{folder} holds an unfinished harvest with different settings ({', '.join(diff[:6])}); "
                             "rerun with the same settings to resume, or set writer.overwrite=true to start over")
    _remove_unlisted(folder, previous, harvester.names)
    sw = ShardWriter(folder, header, writer.shard_tokens, writer.dtype, previous)
    resume, budget, start_tokens = sw.resume_point, harvest.max_tokens, sw.tokens
    start_context = 0 if resume is None else resume[0] // harvest.batch_size * harvest.batch_size
    t0 = time.perf_counter()
    bar = tqdm(total=budget or None, initial=sw.tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not harvest.progress, desc=f"harvest {','.join(harvester.names)[:40]}")
    chunks = harvester.chunks(ds, start_context=start_context) if not budget or sw.tokens < budget else iter(())
    try:
        for chunk in chunks:
            if resume is not None:
                chunk, resume = _skip_written(chunk, *resume), None
            if budget:
                chunk = chunk.select(slice(0, budget - sw.tokens))
            sw.append(chunk)
            bar.update(len(chunk))
            if budget and sw.tokens >= budget:
                break
    finally:
        bar.close()
    if sw.tokens == 0:
        raise ValueError(f"text dataset {text.name!r} gave no tokens to harvest (empty documents, or every token "
                         "dropped as special); nothing was written")
    if budget and sw.tokens < budget:
        log.warning("text ran out after %d tokens, short of harvest.max_tokens=%d", sw.tokens, budget)
    manifest = sw.finish()
    return HarvestResult(folder, manifest, sw.tokens - start_tokens, time.perf_counter() - t0, previous is not None)


def format_harvest_summary(result: HarvestResult) -> str:
    m = result.manifest
    rate = result.new_tokens / max(result.seconds, 1e-9)
    hps = ", ".join(f"{hp} (d={m['hookpoints'][hp]['d']})" for hp in m["hookpoint_order"])
    return (f"buffer: {result.folder}\n  {m['tokens']} tokens in {len(m['shards'])} shard(s) of {m['dtype']}; "
            f"hook points: {hps}\n  this run: {result.new_tokens} tokens in {result.seconds:.1f}s "
            f"({rate:.0f} tokens/s){' (resumed)' if result.resumed else ''}")
