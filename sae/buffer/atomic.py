"""Crash-safe file writes for the buffer: temporary name, fsync, rename, fsync the folder.

After a crash (kill -9, power loss) a path holds either its old content or its new content,
never a mix; a leftover temporary file (``.<name>.tmp``) is garbage that the next writer removes.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def naming_the_file(path: Path):
    """Re-raise a full disk or quota error with the file it hit and the fix (the OS names neither)."""
    try:
        yield
    except Exception as e:  # safetensors reports I/O errors as its own type, with the OS error in the text
        full = e.errno in (errno.ENOSPC, errno.EDQUOT) if isinstance(e, OSError) else \
            any(s in str(e) for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))
        if full:
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path}; free space there or "
                          "point the output at another disk, then rerun: finished files are kept") from e
        raise


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Raises:
        OSError: as the OS raised it; a full disk names ``path``.
    """
    tmp = tmp_name(path)
    with naming_the_file(path):
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON (sorted keys: equal objects give equal bytes)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())
