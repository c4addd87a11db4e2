"""The training output folder: one writer at a time, and a resume only of the same run.

- **One writer.** A run holds an exclusive lock (``flock`` on ``<out_dir>/.lock``) from claiming
  the folder to the end of training; a second run into the folder fails at once. The kernel drops
  the lock when its holder dies, so a killed run never blocks the next one.
- **One run.** ``run.json`` records the run's identity when the folder is first claimed: every
  SAE's architecture, settings and sizes, the hook points, batch size, world size, strategy and
  the data source's identity. Resuming with a different identity is refused before anything in the
  folder changes, naming every differing key; so is "resuming" a run that already finished
  (``final/`` written and marked complete, :data:`FINISHED`). A run killed after its last
  checkpoint but before ``final/`` was complete is not finished: the rerun resumes at that
  checkpoint, trains no step and writes ``final/`` from it.
  ``train.resume=false`` moves an existing run aside (``<out_dir>.replaced-<time>``) and starts
  afresh; nothing is deleted.

Sits in ``sae/train`` between the trainer (which builds the identity) and the checkpoints.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from sae.buffer.atomic import write_json_atomic

from .checkpoint import latest_checkpoint, read_manifest

log = logging.getLogger(__name__)

IDENTITY = "run.json"
LOCK = ".lock"
FINISHED = "final/.complete"  # written last, after every rank's final/ weights
#: Names one of which any training run's folder holds (older versions wrote no run.json).
RUN_FILES = {IDENTITY, "checkpoints", "config.yaml", "metrics.jsonl", "final"}


def identity_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif isinstance(a, dict) and b is None:
            out.append(f"{prefix}{k}: only in the old run")
        elif isinstance(b, dict) and a is None:
            out.append(f"{prefix}{k}: new in this run")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparisons with run.json."""
    return json.loads(json.dumps(obj, default=str))


class RunFolder:
    """Claims ``out_dir`` for one training run (see the module docstring)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir)
        self._fd: int | None = None
        self._previous_holder = b""
        self.created = False  # whether claiming made the folder
        self.fresh = False  # whether it held nothing (of a run) when claimed

    def lock(self) -> None:
        """Take the folder's lock (created with the folder), or fail at once.

        Raises:
            RuntimeError: another live run holds it.
        """
        if Path.cwd().resolve().is_relative_to(self.path.resolve()):
            raise ValueError(f"train.out_dir={self.path} is the current directory or holds it; a run needs a folder of "
                             "its own (it may be moved aside by train.resume=false): pick a subfolder such as "
                             "train.out_dir=runs/my_run")
        self.created = self.created or not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(f"another training run is writing train.out_dir={self.path} (process {holder}); "
                               "wait for it to finish or pick another train.out_dir") from None
        self._previous_holder = os.pread(fd, 200, 0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        self._fd = fd

    def _restore_holder(self) -> None:
        """Make the lock file name its previous holder again (a refused or moved-aside claim)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, self._previous_holder, 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def holds_a_run(self) -> bool:
        """Whether the folder holds anything of an earlier run (besides the lock file)."""
        return self.path.is_dir() and any(p.name != LOCK for p in self.path.iterdir())

    def move_aside(self) -> Path:
        """Rename the folder to ``<name>.replaced-<time>`` and claim a fresh, empty one."""
        aside = self.path.with_name(f"{self.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside = aside.with_name(f"{aside.name.split('~')[0]}~{n}")
            n += 1
        self._restore_holder()  # the old run's lock file keeps naming its own last holder
        os.rename(self.path, aside)
        self.release()  # the lock moved with the old folder
        self.lock()
        return aside

    def claim(self, identity: dict[str, Any], *, resume: bool, total_steps: int) -> Path | None:
        """Lock the folder and make sure it holds this run (or nothing). Returns where an earlier
        run was moved (``resume=False``), else None.

        Raises:
            RuntimeError: another run holds the folder.
            ValueError: the folder holds a different run, or this run finished already.
        """
        had_lock_file = (self.path / LOCK).exists()
        self.lock()
        try:
            moved = self._check(jsonable(identity), resume, total_steps)
            write_json_atomic(self.path / IDENTITY, jsonable(identity))
            return moved
        except BaseException:
            self._restore_holder()
            self.release()
            if not had_lock_file:  # a refused claim leaves the folder as it found it
                (self.path / LOCK).unlink(missing_ok=True)
                if self.created and not any(self.path.iterdir()):
                    self.path.rmdir()
            raise

    def _check(self, identity: dict[str, Any], resume: bool, total_steps: int) -> Path | None:
        if not self.holds_a_run():
            self.fresh = True
            return None
        names = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
        if not set(names) & RUN_FILES:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ValueError(f"train.out_dir={self.path} holds {shown} and no {IDENTITY}: it is not a training run's "
                             "folder (a buffer, a model?), and a run would mix its files into it; pick an empty or "
                             "new train.out_dir")
        fix = (f"pick another train.out_dir, or set train.resume=false to start over (the old run is then moved to "
               f"{self.path.name}.replaced-<time>, not deleted)")
        if not resume:
            self.fresh = True
            aside = self.move_aside()
            log.warning("train.resume=false: the run that was in %s is now in %s", self.path, aside)
            return aside
        stored_path = self.path / IDENTITY
        if stored_path.is_file():
            try:
                stored = json.loads(stored_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{stored_path} is not valid JSON ({e}); {fix}") from None
            diff = identity_diff(stored, identity)
            if diff:
                raise ValueError(f"train.out_dir={self.path} holds a different run; it differs in: "
                                 f"{'; '.join(diff)}. To resume it, run with its settings; else {fix}")
        elif latest_checkpoint(self.path) is not None:
            log.warning("%s has checkpoints but no %s (written by an older version): resuming without checking "
                        "that the settings match", self.path, IDENTITY)
        ckpt = latest_checkpoint(self.path)
        if ckpt is not None:
            step = int(read_manifest(ckpt)["step"])
            if step >= total_steps and (self.path / FINISHED).is_file():
                raise ValueError(f"train.out_dir={self.path} holds a finished run (step {step} of {total_steps}); "
                                 "raise train.steps or train.max_tokens to train it further, or " + fix)
            if step >= total_steps:
                log.warning("%s stopped after its last checkpoint (step %d) before final/ was complete: writing "
                            "final/ from that checkpoint", self.path, step)
        return None

    def discard_unused(self) -> bool:
        """After a failed run: empty a folder that held nothing when claimed and got no checkpoint
        (nothing to resume), and remove it if claiming made it, so the rerun starts as the first did.

        Returns:
            Whether the folder was discarded.
        """
        if not self.fresh or latest_checkpoint(self.path) is not None:
            return False
        for p in self.path.iterdir():
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        self.release()
        (self.path / LOCK).unlink(missing_ok=True)
        if self.created:
            self.path.rmdir()
        return True

    def mark_finished(self, step: int) -> None:
        """Record that ``final/`` is complete (called once every rank has written its part)."""
        write_json_atomic(self.path / FINISHED, {"step": step})
