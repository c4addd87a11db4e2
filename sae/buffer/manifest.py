"""The buffer's layout on disk and its ``manifest.json`` (harvest -> buffer -> reader).

Layout of a buffer folder::

    manifest.json                              what is complete, replaced atomically per shard
    <hookpoint>/shard_000000.safetensors       activations [N, D] + token_ids, positions, contexts [N]
    <hookpoint>/shard_000001.safetensors       ...

Shard ``i`` of every hook point holds the same N tokens in the same order, so a transcoder reads
input and target rows by the same index. A shard exists for readers only once the manifest
lists it with its size and xxh3-64 checksum; files the manifest does not name are leftovers of
an interrupted write and are deleted on resume.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from sae.paths import inside

MANIFEST = "manifest.json"
FORMAT = "sae-forge-activations"
VERSION = 1
CHECKSUM = "xxh3_64"
ACTIVATIONS = "activations"
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# Manifest keys that fix the content of every shard: resuming with any of them changed would
# mix two different harvests in one buffer. (harvest.max_tokens may change: it only cuts.)
IDENTITY_KEYS = ("model", "tokenizer", "dataset", "text", "harvest", "hookpoints", "hookpoint_order", "dtype",
                 "shard_tokens")


def shard_relpath(hookpoint: str, index: int) -> str:
    return f"{hookpoint}/shard_{index:06d}.safetensors"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``<folder>/manifest.json``.

    Raises:
        FileNotFoundError: no manifest (not a buffer, or a harvest that never finished a shard).
        ValueError: not valid JSON, not a manifest of this format/version, a key missing or of the wrong
            type (see :func:`check_manifest`).
        sae.paths.UnsafePathError: a hook point or shard path pointing outside ``folder``.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: not an activation buffer (run sae-harvest first, "
                                "or point data.buffer.path at the harvest's writer.out_dir)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the buffer's manifest is damaged; restore it from a "
                         "copy or harvest the buffer again") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds a JSON {type(manifest).__name__}, not a buffer manifest; restore it from a "
                         "copy or harvest the buffer again")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                         f"this reader reads {FORMAT!r} version {VERSION}")
    check_manifest(path, manifest)
    return manifest


_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "true or false"}


def _damaged(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}; the buffer is damaged or was edited: restore {MANIFEST} from a copy, "
                      f"or delete {path.parent} and harvest it again")


def _typed(path: Path, name: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _damaged(path, f"'{name}' is {json.dumps(value)[:60]}, not {_KINDS[kind]}")
    return value


def _field(path: Path, obj: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
    if key not in obj:
        raise _damaged(path, f"'{where}{key}' is missing")
    return _typed(path, where + key, obj[key], kind)


def check_manifest(path: Path, m: dict[str, Any]) -> None:
    """Check the keys and types the buffer code reads, and that every path in ``m`` stays inside the folder.

    Hook point names are folder names (an overwrite removes them) and shard paths are opened, so each
    goes through :func:`sae.paths.inside`.

    Raises:
        ValueError: a key missing or of the wrong type, naming the file and the key.
        sae.paths.UnsafePathError: a hook point or shard path that points outside the folder.
    """
    folder = path.parent
    _field(path, m, "complete", bool)
    _field(path, m, "tokens", int)
    _field(path, m, "stats", dict)
    hookpoints = _field(path, m, "hookpoints", dict)
    order = _field(path, m, "hookpoint_order", list)
    for i, hp in enumerate(order):
        inside(folder, hp, f"{path} hookpoint_order[{i}]")
    if sorted(order) != sorted(hookpoints):
        raise _damaged(path, f"'hookpoint_order' {order} does not list the keys of 'hookpoints' {sorted(hookpoints)} "
                             "once each")
    for hp in order:
        _field(path, _field(path, hookpoints, hp, dict, "hookpoints."), "d", int, f"hookpoints.{hp}.")
    for i, shard in enumerate(_field(path, m, "shards", list)):
        where = f"shards[{i}]."
        _field(path, _typed(path, where.rstrip("."), shard, dict), "tokens", int, where)
        files = _field(path, shard, "files", dict, where)
        for hp in order:
            entry = _field(path, files, hp, dict, f"{where}files.")
            inside(folder, _field(path, entry, "path", str, f"{where}files.{hp}."), f"{path} {where}files.{hp}.path")
            _field(path, entry, "bytes", int, f"{where}files.{hp}.")
            _field(path, entry, CHECKSUM, str, f"{where}files.{hp}.")
    if "resume" not in m or m["resume"] is not None:
        resume = _field(path, m, "resume", dict)
        _field(path, resume, "context", int, "resume.")
        _field(path, resume, "skip_rows", int, "resume.")


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two manifests' identity sections."""
    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b)) for d in walk(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [prefix.rstrip(".")]

    return [d for k in IDENTITY_KEYS for d in walk(old.get(k), new.get(k), f"{k}.")]


def safetensors_layout(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header dict) of a safetensors file, reading only the header."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"shard {path} is truncated ({len(head)} bytes); re-harvest it")
        (n,) = struct.unpack("<Q", head)
        header = fh.read(n)
    if len(header) < n:
        raise ValueError(f"shard {path} is truncated inside its header; re-harvest it")
    try:
        return 8 + n, json.loads(header)
    except json.JSONDecodeError as e:
        raise ValueError(f"shard {path} has a corrupt header ({e}); re-harvest it") from e


def activation_slot(path: Path) -> tuple[int, torch.dtype, tuple[int, int]]:
    """(byte offset, dtype, shape) of the ``activations`` tensor inside a shard file."""
    base, header = safetensors_layout(path)
    entry = header.get(ACTIVATIONS)
    if entry is None or entry.get("dtype") not in _SAFETENSORS_DTYPES or len(entry.get("shape", ())) != 2:
        raise ValueError(f"shard {path} has no 2-D float '{ACTIVATIONS}' tensor; is it a buffer shard?")
    start = base + entry["data_offsets"][0]
    return start, _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
