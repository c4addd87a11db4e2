"""Export: checkpoint -> one folder per hook point (weights, cfg.json, README.md) -> optionally the Hub.

Layout written under ``out_dir``::

    README.md                  repo card: the SAEs, how to load them (the Hub's front page)
    <hookpoint>/README.md      model card of one SAE
    <hookpoint>/...            weights + cfg.json in the chosen format (see .native, .saelens, .sparsify)

The folder is the SAE's hook point (``layers.3``), or its name in the run when the hook point is
unknown (synthetic data); SAEs sharing a hook point (a sweep over k) get ``<hookpoint>/<name>``.
circuit-tracer takes all of a model's transcoders from one folder: ``--format circuit-tracer``
writes them (per-layer transcoders, or one cross-layer transcoder) into ``out_dir`` itself, with
``config.yaml`` and a README.md (see :mod:`.circuit_tracer`).
These are the ``sae_id`` of ``sae_lens.SAE.from_pretrained(repo, sae_id)`` and the ``hookpoint``
of ``sparsify.Sae.load_from_hub(repo, hookpoint)``. Output bytes depend only on the inputs, so
exporting again and re-uploading an unchanged checkpoint commits nothing.

A non-empty ``out_dir`` is refused unless ``overwrite``: the export is written whole into a hidden
sibling folder that then replaces ``out_dir`` (nothing of an earlier export, or of the user's, mixes
in), and a failure leaves ``out_dir`` as it was.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sae.paths import replacing_dir

from . import circuit_tracer, native, saelens, sparsify
from .card import CardEntry, repo_card, sae_card
from .collect import collect
from .item import ExportItem
from .load import FORMATS

log = logging.getLogger(__name__)

WRITERS: dict[str, Callable[[ExportItem, Path, torch.dtype], None]] = {
    "ours": native.write_native, "saelens": saelens.write_saelens, "sparsify": sparsify.write_sparsify}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportResult:
    out_dir: Path
    folders: dict[str, Path]
    """SAE name -> its exported folder."""
    format: str
    commit_url: str = ""


def folder_names(items: list[ExportItem]) -> list[str]:
    """Folder of each SAE inside the export root (see the module docstring)."""
    base = [i.hookpoint or i.name for i in items]
    seen = Counter(base)
    names = [f"{b}/{i.name}" if seen[b] > 1 else b for b, i in zip(base, items)]
    for n in names:
        if n.startswith("/") or ".." in n.split("/"):
            raise ValueError(f"hook point / SAE name {n!r} cannot be used as a folder name; pass --hookpoint")
    return names


def check_options(fmt: str, dtype: str) -> torch.dtype:
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_exportable(items: list[ExportItem], fmt: str) -> None:
    """Raise ``ValueError`` when ``fmt`` cannot represent one of ``items`` (the message names the fix)."""
    if fmt == "circuit-tracer":
        circuit_tracer.check_exportable(items)
        return
    for item in items:
        if fmt == "saelens":
            saelens.saelens_architecture(item.sae)
        elif fmt == "sparsify":
            sparsify.check_exportable(item.sae)
    folder_names(items)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty folder unless ``overwrite``.

    Raises:
        ValueError: naming the path and the fix.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {out} is a file, not a folder; export to a new folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"the output folder {out} is not empty; pass --overwrite (overwrite=True) to replace its "
                         "contents, or export to a new folder")


def write_export(items: list[ExportItem], folder: Path, fmt: str, dtype: torch.dtype, repo_id: str = "",
                 name: str = "") -> dict[str, str]:
    """Write ``items`` in format ``fmt`` with model cards into the new folder ``folder``.

    Args:
        name: the export's final folder name (circuit-tracer records it when there is no ``repo_id``).

    Returns:
        SAE name -> its folder, relative to ``folder``.
    """
    if fmt == "circuit-tracer":  # one folder for the whole set
        circuit_tracer.write_circuit_tracer(items, folder, dtype, repo_id, name)
        (folder / "README.md").write_text(circuit_tracer.card(items, repo_id), encoding="utf-8")
        names = [i.name for i in items]  # one run per layer: often the same name, then the hook point tells
        return {i.name if names.count(i.name) == 1 else i.hookpoint or i.name: "." for i in items}
    entries = [CardEntry(item, rel) for item, rel in zip(items, folder_names(items))]
    for entry in entries:
        WRITERS[fmt](entry.item, folder / entry.folder, dtype)
        (folder / entry.folder / "README.md").write_text(sae_card(fmt, entry, repo_id), encoding="utf-8")
    (folder / "README.md").write_text(repo_card(fmt, entries, repo_id), encoding="utf-8")
    return {e.item.name: e.folder for e in entries}


def export_items(items: list[ExportItem], out_dir: str | Path, fmt: str = "saelens", *, dtype: str = "float32",
                 repo_id: str = "", overwrite: bool = False) -> ExportResult:
    """Write ``items`` into ``out_dir`` in format ``fmt`` with model cards.

    Args:
        overwrite: replace a non-empty ``out_dir`` (its whole contents) rather than refuse it.

    Raises:
        ValueError: unknown format/dtype, an SAE the format cannot represent, or a non-empty
        ``out_dir`` without ``overwrite`` (all checked before anything is written).
        OSError: ``out_dir`` cannot be created (naming the folder and the fix).
    """
    torch_dtype = check_options(fmt, dtype)
    if not items:
        raise ValueError("nothing to export")
    check_exportable(items, fmt)
    out = Path(out_dir)
    check_output(out, overwrite)
    with replacing_dir(out, "export") as tmp:
        folders = write_export(items, tmp, fmt, torch_dtype, repo_id, Path(os.path.realpath(out)).name)
    return ExportResult(out, {name: out / rel for name, rel in folders.items()}, fmt)


def check_apart(source: str | Path, out_dir: str | Path) -> None:
    """Refuse an output folder that is, contains or lies inside a local source (it would overwrite
    or mix with the training artefacts).

    Raises:
        ValueError: naming both folders and the fix.
    """
    src = Path(source).expanduser()
    if not src.exists():
        return  # a Hub repo id
    src, out = src.resolve(), Path(out_dir).expanduser().resolve()
    how = ("is" if out == src else "lies inside" if src in out.parents else "contains" if out in src.parents
           else None)
    if how is not None:
        raise ValueError(f"the output folder {out_dir} {how} the source {source}; export to a folder outside it "
                         f"(e.g. {src.parent / (src.name + '-export')})")


def export_checkpoint(path: str | Path | Sequence[str | Path], out_dir: str | Path, fmt: str = "saelens", *,
                      hookpoint: str | None = None, model_name: str | None = None, dtype: str = "float32",
                      push_to_hub: str = "", private: bool = False, revision: str | None = None,
                      overwrite: bool = False) -> ExportResult:
    """``sae-export``: read the SAEs at ``path``, write them to ``out_dir``, optionally upload.

    Args:
        path: an SAE folder, shard folder, checkpoint step, ``final/`` or run folder, or a folder /
            Hub repo id in another supported format (converted); or several of them, exported
            together (a circuit-tracer set of transcoders trained one layer per run).
        hookpoint: folder name to use for a single SAE (and the SAE to pick from a foreign
            multi-SAE source).
        model_name: model recorded in the card and SAELens metadata when the checkpoint lacks it.
        push_to_hub: repo id to upload ``out_dir`` to ("" : no upload).
        overwrite: replace a non-empty ``out_dir`` rather than refuse it (see :func:`export_items`).
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    check_options(fmt, dtype)
    for p in paths:
        check_apart(p, out_dir)
    check_output(Path(out_dir), overwrite)  # before reading the sources
    if push_to_hub:  # fail before any work when the upload cannot happen
        from .hub import resolve_token

        resolve_token()
    items = [item for p in paths for item in collect(p, hookpoint)]
    if hookpoint:
        if len(items) > 1:
            where = f"{paths[0]} holds" if len(paths) == 1 else f"{', '.join(map(str, paths))} hold"
            raise ValueError(f"--hookpoint {hookpoint!r} names one SAE but {where} {len(items)} "
                             f"({', '.join(i.name for i in items)}); export them separately or drop --hookpoint")
        items[0].hookpoint = hookpoint
    for item in items:
        item.model_name = item.model_name or (model_name or "")
    result = export_items(items, out_dir, fmt, dtype=dtype, repo_id=push_to_hub, overwrite=overwrite)
    if push_to_hub:
        from .hub import push_to_hub as upload

        result.commit_url = upload(result.out_dir, push_to_hub, private=private, revision=revision)
    return result
