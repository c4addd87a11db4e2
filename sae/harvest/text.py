"""Text in, fixed-length token contexts out (harvest stage, before the model forward).

``load_text_dataset`` opens the built-in corpus, a hub dataset or local files through
``datasets``; ``iter_contexts`` tokenises documents lazily (bounded memory) and packs them into
contexts numbered 0, 1, 2, ... in a fixed order, so a harvest can restart at any context and
get the same tokens; ``iter_batches`` groups contexts into padded batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import TextConfig
from .corpus import NAME as BUILTIN_NAME
from .corpus import python_docs_dataset, python_docs_fingerprint

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
TOKENIZE_DOCS = 256  # documents tokenised per call: large enough for the fast tokenizer's batching


@dataclass
class Context:
    index: int
    """Position of this context in the harvest order (0, 1, 2, ...)."""
    ids: list[int]


@dataclass
class ContextBatch:
    input_ids: Tensor
    """[B, T] token ids, right-padded."""
    attention_mask: Tensor
    """[B, T] 1 for real tokens, 0 for padding."""
    index: Tensor
    """[B] context indices."""


def _local_files(cfg: TextConfig) -> list[str]:
    if cfg.data_files:
        return [str(Path(f).expanduser()) for f in cfg.data_files]
    path = Path(cfg.name).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in BUILDERS)
        if not files:
            raise ValueError(f"text.name={cfg.name!r} is a folder with no {sorted(BUILDERS)} files")
        return files
    return [str(path)] if path.is_file() else []


def load_text_dataset(cfg: TextConfig) -> Any:
    """The dataset named by ``cfg``: a ``datasets.Dataset`` (or ``IterableDataset`` when streaming).

    Raises:
        ValueError: unknown builtin, mixed/unknown file types, an empty dataset, or a missing column.
    """
    from datasets import load_dataset

    if cfg.name.startswith("builtin:") and not cfg.data_files:
        if cfg.name != BUILTIN_NAME:
            raise ValueError(f"text.name={cfg.name!r}: the built-in corpus is {BUILTIN_NAME!r}")
        ds = python_docs_dataset()
    elif files := _local_files(cfg):
        kinds = {BUILDERS.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"text files {files[:3]}... must all be one of {sorted(BUILDERS)}; "
                             f"got {sorted(map(str, kinds))}")
        empty = ValueError(f"text files {files[:3]} are empty; point text.name at files with rows")
        if all(Path(f).stat().st_size == 0 for f in files):
            raise empty
        try:
            ds = load_dataset(kinds.pop(), data_files=files, split="train", streaming=cfg.streaming)
        except ValueError as e:  # datasets' wording for files without rows
            if "corresponds to no data" in str(e):
                raise empty from e
            raise
    else:
        ds = load_dataset(cfg.name, cfg.config_name or None, split=cfg.split, revision=cfg.revision or None,
                          streaming=cfg.streaming)
    check_text_dataset(ds, cfg)
    return ds


def check_text_dataset(ds: Any, cfg: TextConfig) -> None:
    """Fail early on an empty dataset or a missing text column."""
    columns = getattr(ds, "column_names", None)
    if columns is None:  # streaming datasets learn their columns from the first row
        first = next(iter(ds), None)
        if first is None:
            raise ValueError(f"text dataset {cfg.name!r} is empty; point text.name at a dataset with rows")
        columns = list(first)
    if cfg.column not in columns:
        raise ValueError(f"text dataset {cfg.name!r} has no column {cfg.column!r}; columns: {columns}. "
                         f"Set text.column to one of them")
    if hasattr(ds, "__len__") and len(ds) == 0:
        raise ValueError(f"text dataset {cfg.name!r} (split {cfg.split!r}) is empty; "
                         "point text.name at a dataset with rows")


def dataset_info(ds: Any, cfg: TextConfig) -> dict[str, Any]:
    """What the manifest records about the text."""
    info: dict[str, Any] = {k: getattr(cfg, k) for k in ("name", "config_name", "split", "data_files", "column",
                                                          "revision")}
    if cfg.name == BUILTIN_NAME and not cfg.data_files:
        info["fingerprint"] = python_docs_fingerprint()
    else:
        info["fingerprint"] = getattr(ds, "_fingerprint", None) or ""
    info["num_rows"] = len(ds) if hasattr(ds, "__len__") else None
    return info


def special_ids(tokenizer: Any) -> tuple[int | None, int | None, int]:
    """(BOS or CLS, EOS or SEP, PAD) ids; PAD falls back to EOS, then 0 (padding is masked anyway)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return bos, eos, pad


def _documents(ds: Any, column: str) -> Iterator[str]:
    for row in ds:
        text = row[column]
        if text:
            yield text


def iter_contexts(ds: Any, tokenizer: Any, cfg: TextConfig) -> Iterator[Context]:
    """Tokenise documents lazily and yield contexts of at most ``cfg.context_length`` tokens.

    Packed: documents are joined with EOS/SEP and cut into full contexts; the last one may be
    shorter. Unpacked: one context per document, truncated. Each context starts with BOS when
    ``cfg.prepend_bos``.

    Raises:
        ValueError: ``prepend_bos`` with a tokenizer that has neither BOS nor CLS.
    """
    bos, eos, _ = special_ids(tokenizer)
    if cfg.prepend_bos and bos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no BOS/CLS token; set text.prepend_bos=false")
    head = [bos] if cfg.prepend_bos else []
    body = cfg.context_length - len(head)
    docs = _documents(ds, cfg.column)
    index = 0
    pending: list[int] = []
    while batch := list(islice(docs, TOKENIZE_DOCS)):
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if not cfg.pack:
                if ids:
                    yield Context(index, head + ids[:body])
                    index += 1
                continue
            pending.extend(ids)
            if eos is not None:
                pending.append(eos)
            start = 0
            while len(pending) - start >= body:
                yield Context(index, head + pending[start:start + body])
                index += 1
                start += body
            del pending[:start]
    if cfg.pack and pending:
        yield Context(index, head + pending)


def iter_batches(contexts: Iterable[Context], batch_size: int, pad_id: int,
                 select: Callable[[int], bool] | None = None) -> Iterator[ContextBatch]:
    """Group the selected contexts into right-padded batches of ``batch_size`` (the last may be smaller)."""
    chosen = (c for c in contexts if select is None or select(c.index))
    while group := list(islice(chosen, batch_size)):
        width = max(len(c.ids) for c in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, c in enumerate(group):
            ids[row, : len(c.ids)] = torch.tensor(c.ids)
            mask[row, : len(c.ids)] = 1
        yield ContextBatch(ids, mask, torch.tensor([c.index for c in group]))
