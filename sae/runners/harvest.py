"""The harvest pipeline: model + text -> Harvester -> ShardWriter, resumable after any interruption.

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
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sae.buffer.atomic import TMP_SUFFIX
from sae.buffer.config import WriterConfig
from sae.buffer.manifest import MANIFEST, identity_diff, read_manifest
from sae.buffer.writer import ShardWriter
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig, validate_harvest
from sae.harvest.harvester import Chunk, Harvester
from sae.harvest.model import LoadedModel, load_model
from sae.harvest.text import dataset_info, load_text_dataset, special_ids
from sae.paths import inside

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
    """Overwrite: drop the manifest first (the buffer stops being complete), then its shards.

    Only hook point folders inside ``folder`` are removed (an edited manifest may name ``../x``).
    """
    shard_dirs = [inside(folder, hp, f"{folder / MANIFEST} hookpoint_order[{i}]")
                  for i, hp in enumerate(manifest["hookpoint_order"])]
    (folder / MANIFEST).unlink()
    for d in shard_dirs:
        shutil.rmtree(d, ignore_errors=True)


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


class BackgroundWriter:
    """Appends chunks to a :class:`ShardWriter` in a thread, up to ``depth`` chunks behind the caller.

    The writer thread waits for each chunk's device-to-host copy, checks it for NaN/Inf and appends
    it (serialisation, checksum, fsync, manifest) while the caller runs the next forward. Order is
    kept, so the shards are byte-identical to a synchronous harvest. The first error in the thread
    (a full disk naming its file, NaN activations naming the row, an interrupt) stops it: no later
    chunk is written, and :meth:`put` / :meth:`close` raise that error in the caller. ``depth=0``
    appends in the caller's thread.
    """

    def __init__(self, sw: ShardWriter, harvester: Harvester, depth: int):
        self.sw, self.harvester, self.depth = sw, harvester, depth
        self._error: BaseException | None = None
        self._abort = False
        if depth > 0:
            self._q: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name="sae-harvest-writer", daemon=True)
            self._thread.start()

    def _append(self, chunk: Chunk) -> None:
        self.sw.append(self.harvester.checked(chunk))

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            if self._error is None and not self._abort:
                try:
                    self._append(chunk)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, chunk: Chunk) -> None:
        if self.depth == 0:
            self._append(chunk)
            return
        self._raise()
        while True:
            try:
                self._q.put(chunk, timeout=0.1)
                return
            except queue.Full:
                self._raise()

    def close(self) -> None:
        """Wait until every queued chunk is written; raise the thread's error if there was one."""
        if self.depth > 0 and self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._raise()

    def abort(self) -> None:
        """The caller failed: finish the chunk being written (shards stay whole), drop the rest."""
        if self.depth > 0 and self._thread.is_alive():
            self._abort = True
            while True:
                try:
                    self._q.get_nowait()
                except queue.Empty:
                    break
            self._q.put(None)
            self._thread.join()


def _skip_written(chunk: Chunk, context: int, rows: int) -> Chunk:
    """Drop rows already in shards: contexts before ``context`` and its first ``rows`` rows.

    A chunk holds whole contexts, so counting within the chunk is exact.
    """
    same = chunk.contexts == context
    before = same.cumsum(0) - 1
    return chunk.select(~((chunk.contexts < context) | (same & (before < rows))))


def _is_leftover(p: Path) -> bool:
    """What may sit in a buffer folder before its first manifest: Hydra's job log (``cli.log``) and
    ``.hydra``, temporaries, and hook point folders holding only shards of an interrupted harvest."""
    if p.is_dir() and not p.is_symlink():
        return p.name == ".hydra" or all(q.is_file() and "shard_" in q.name for q in p.iterdir())
    return p.suffix == ".log" or (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX))


def _previous(folder: Path, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of the buffer at ``folder``, None for a new or empty folder.

    Raises:
        FileExistsError: a complete buffer and no ``overwrite``.
        ValueError: ``folder`` holds files but no manifest (a model, an SAE run, anything not ours),
            or a damaged manifest.
    """
    if not (folder / MANIFEST).is_file():
        foreign = sorted(p.name for p in folder.iterdir() if not _is_leftover(p)) if folder.is_dir() else []
        if foreign:
            names = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
            raise ValueError(f"writer.out_dir={folder} holds {names} and no {MANIFEST}: it is not an activation "
                             "buffer, and harvesting would mix shards into it; pick an empty or new writer.out_dir")
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
            activations, a resume whose model/text/hook points differ from the buffer's, an
            out_dir that holds files but is not a buffer, or a damaged manifest (a path in it
            pointing outside the folder included: nothing is removed then).
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
    queued = sw.tokens  # rows appended or queued for the writer thread
    chunks = harvester.chunks(ds, start_context=start_context, wait=False) if not budget or queued < budget \
        else iter(())
    writer_thread = BackgroundWriter(sw, harvester, harvester.pipeline_depth)
    try:
        for chunk in chunks:
            if resume is not None:
                chunk, resume = _skip_written(harvester.checked(chunk), *resume), None
            if budget:
                chunk = chunk.select(slice(0, budget - queued))
            writer_thread.put(chunk)
            queued += len(chunk)
            bar.update(len(chunk))
            if budget and queued >= budget:
                break
    except BaseException:
        writer_thread.abort()
        raise
    else:
        writer_thread.close()
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
