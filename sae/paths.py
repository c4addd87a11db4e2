"""Paths read from files a user may have edited or downloaded (manifest.json, cfg.json, run.json,
checkpoints) stay inside the folder that holds them; folders written as a whole (exports, reports)
replace their old version atomically (:func:`replacing_dir`).

A manifest entry ``"../victim"`` or ``"/home/me"`` would otherwise let an overwrite delete, or a
reader read, anything the user can reach. Every such entry goes through :func:`inside` before it is
opened, listed or removed. Lowest layer: imports nothing of ``sae``.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class UnsafePathError(ValueError):
    """An entry of a metadata file points outside its folder."""


def inside(folder: str | Path, entry: object, what: str) -> Path:
    """``folder / entry``, refused unless it is a relative path that stays inside ``folder``.

    Args:
        folder: the folder the metadata file describes.
        entry: the path (or name) as read from the file.
        what: where the entry came from, for the message (e.g. ``"manifest.json hookpoint_order[2]"``).

    Returns:
        The joined path (not resolved, so relative folders stay relative).

    Raises:
        UnsafePathError: ``entry`` is not a non-empty string, is absolute, contains ``..``, or resolves
        (through a symbolic link) outside ``folder``.
    """
    if not isinstance(entry, str) or not entry or "\x00" in entry:
        raise UnsafePathError(f"{what} is {entry!r}, not a relative path inside {folder}; the file is damaged or "
                              "was edited: restore it or recreate the folder")
    rel = Path(entry)
    if rel.is_absolute() or ".." in rel.parts or rel.parts == (".",):
        raise UnsafePathError(f"{what} is {entry!r}, which points outside {folder}; refusing to read, write or "
                              "delete it: restore the file or recreate the folder")
    path = Path(folder) / rel
    base = Path(folder).resolve()
    if not path.resolve().is_relative_to(base):
        raise UnsafePathError(f"{what} is {entry!r}, which resolves to {path.resolve()} outside {folder} (a symbolic "
                              "link); refusing to follow it: remove the link or recreate the folder")
    return path


@contextmanager
def replacing_dir(out: str | Path, what: str) -> Iterator[Path]:
    """A new hidden sibling folder of ``out`` to write into, which then replaces ``out``.

    On success the old ``out`` is renamed aside, the new folder renamed in and the old one removed;
    on any failure the new folder is removed and ``out`` is left as it was.

    Args:
        what: what the folder holds (``export``, ``report``), for the messages.

    Raises:
        OSError: the folder that holds ``out`` cannot be written (naming it and the fix).
    """
    target = Path(os.path.realpath(out))  # a symbolic link keeps pointing at the new folder
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp, aside = (target.with_name(f".{target.name}.{kind}-{token}") for kind in (what, "replaced"))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:  # the OS names the hidden folder, not the user's, and no fix
        where = Path(e.filename or tmp).parent
        why = "no permission to write in" if isinstance(e, PermissionError) else f"{e.strerror or e} in"
        raise type(e)(f"cannot create the {what} folder {out}: {why} {where}; write the {what} to a folder you "
                      "can write to") from None
    try:
        yield tmp
        if target.exists():
            os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            if aside.exists():
                os.rename(aside, target)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if aside.exists():
        log.warning("could not remove the replaced %s %s; delete it by hand", what, aside)
