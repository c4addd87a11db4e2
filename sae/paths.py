"""Paths read from files a user may have edited or downloaded (manifest.json, cfg.json, run.json,
checkpoints) stay inside the folder that holds them.

A manifest entry ``"../victim"`` or ``"/home/me"`` would otherwise let an overwrite delete, or a
reader read, anything the user can reach. Every such entry goes through :func:`inside` before it is
opened, listed or removed. Lowest layer: imports nothing of ``sae``.
"""

from __future__ import annotations

from pathlib import Path


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
