"""What every runner of the peer benchmark shares: reading activations, timing steps, measuring memory.

Part of ``python -m sae.bench.peers`` (bench stage). Each system (ours, SAELens, sparsify) trains
in its own process; the peer runners run in another virtual environment and must not import
sae-forge, so this module depends on the standard library and torch only. The runners import it
as ``sae_peers.runtime``, and so does sae-forge's own runner (:mod:`sae.bench.peer_ours`).

The activation file is a safetensors file with fp32 tensors ``train`` [N, D] and ``heldout``
[M, D] and a ``__metadata__`` entry ``info`` (JSON). It is read with ``os.pread`` rather than
mmap: pages of a mapped file count towards a process's resident set, which would add the whole
training split to every system's peak memory.

Step time is the period of a library's own training loop: each batch request is time-stamped,
so a step's time covers everything the loop does between two batches (forward, backward,
optimiser, decoder normalisation, dead-latent bookkeeping, logging) plus reading one batch, which
costs the same for every system.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

_DTYPES = {"F32": (torch.float32, 4)}


class ActivationFile:
    """Row-range reads from a safetensors file of 2-D fp32 tensors, without mmap.

    The file stays open from construction on, so replacing it on disk (a new harvest) does not
    change what an open reader sees.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 (held for the reader's lifetime)
        (n,) = struct.unpack("<Q", os.pread(self._fh.fileno(), 8, 0))
        header = json.loads(os.pread(self._fh.fileno(), n, 8))
        self.base = 8 + n
        meta = header.pop("__metadata__", {}) or {}
        self.info: dict[str, Any] = json.loads(meta.get("info", "{}"))
        self.tensors = header
        for name, t in header.items():
            if t["dtype"] not in _DTYPES or len(t["shape"]) != 2:
                raise ValueError(f"{self.path}: tensor {name!r} is {t['dtype']} {t['shape']}; the benchmark "
                                 "expects 2-D F32 activations [tokens, d]")

    def shape(self, name: str) -> tuple[int, int]:
        """(rows, d) of tensor ``name``."""
        if name not in self.tensors:
            raise KeyError(f"{self.path} has no tensor {name!r}; it has {sorted(self.tensors)}")
        rows, d = self.tensors[name]["shape"]
        return int(rows), int(d)

    def rows(self, name: str, start: int, n: int) -> torch.Tensor:
        """Rows ``[start, start + n)`` of ``name`` as a fresh [n, d] fp32 tensor."""
        total, d = self.shape(name)
        if start < 0 or start + n > total:
            raise IndexError(f"rows [{start}, {start + n}) outside {name!r} of {total} rows")
        dtype, size = _DTYPES[self.tensors[name]["dtype"]]
        offset = self.base + self.tensors[name]["data_offsets"][0] + start * d * size
        buf = bytearray(n * d * size)
        view, done = memoryview(buf), 0
        while done < len(buf):
            got = os.preadv(self._fh.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read at byte {offset + done}")
            done += got
        return torch.frombuffer(buf, dtype=dtype).view(n, d)


class TimedBatches:
    """The ``steps`` training batches in file order (cycling when the budget exceeds the file),
    time-stamping each request."""

    def __init__(self, data: ActivationFile, batch: int, steps: int):
        rows, self.d = data.shape("train")
        if rows < batch:
            raise ValueError(f"the train split has {rows} rows, fewer than one batch of {batch}")
        self.data, self.batch, self.steps = data, batch, steps
        self.num_batches = rows // batch
        self.stamps: list[float] = []

    def get(self, i: int) -> torch.Tensor:
        """Batch ``i`` of training (stamped)."""
        self.stamps.append(time.perf_counter())
        return self.data.rows("train", (i % self.num_batches) * self.batch, self.batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.steps):
            yield self.get(i)

    def step_seconds(self) -> list[float]:
        """Time between consecutive batch requests: one entry per step except the last."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def rss_mib() -> float:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def baseline_rss_mib() -> float:
    """Resident set once everything a training run imports is loaded: ``torch._dynamo`` (which
    every torch optimizer imports on construction, with Triton when it is installed) included,
    so that growth beyond this baseline is the run's own memory (weights, optimiser state,
    batch tensors, workspaces)."""
    import torch._dynamo  # noqa: F401

    return rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set size of this process's own address space (``VmHWM``).

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the high-water mark of the address
    space replaced by ``exec`` into it, and that space is a fork of the parent, so a runner
    started by a large driver would report at least the driver's size.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_threads(n: int) -> int:
    """Pin torch's intra-op threads; returns the count torch reports."""
    torch.set_num_threads(n)
    return torch.get_num_threads()


def read_job(argv: list[str] | None = None) -> dict[str, Any]:
    """The job dict from the JSON file named on the command line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: <runner> JOB.json")
    return json.loads(Path(args[0]).read_text())


def summarize(job: dict[str, Any], batches: TimedBatches, rss_start: float, **extra: Any) -> dict[str, Any]:
    """The result record every runner writes: per-step times, their median after the warm-up
    steps, tokens/s, the loop's time from the first to the last batch request, and memory
    (``rss_start``: resident set after imports and setup, before the SAE is built)."""
    steps = batches.step_seconds()
    timed = steps[job["timing_warmup"]:] or steps
    median = statistics.median(timed) if timed else float("nan")
    return {
        "system": job["system"], "arch": job["arch"], "num_latents": job["num_latents"], "k": job["k"],
        "batch": job["batch"], "steps": job["steps"], "threads": torch.get_num_threads(),
        "torch": torch.__version__, "step_seconds": steps, "median_step_s": median,
        "tokens_per_s": job["batch"] / median, "loop_s": sum(steps),
        "peak_rss_mib": peak_rss_mib(), "rss_start_mib": rss_start, **extra,
    }


def write_result(job: dict[str, Any], result: dict[str, Any]) -> None:
    """Write ``result.json`` into the job's ``out_dir``."""
    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
