"""The one module that talks to ``torch.distributed``; every helper is a no-op at world size 1.

Strategies call these helpers; the trainer and the models never call ``dist.*`` themselves.
``CommStats`` counts the bytes each rank sends through these helpers, for the benchmarks.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommStats:
    bytes: int = 0
    calls: int = 0

    def add(self, t: Tensor, factor: float = 1.0) -> None:
        self.bytes += int(t.numel() * t.element_size() * factor)
        self.calls += 1


STATS = CommStats()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(backend: str = "auto", timeout_s: int = 600) -> torch.device | None:
    """Join the process group described by torchrun/accelerate environment variables.

    Returns the device this rank should use (``cuda:LOCAL_RANK`` with NCCL), or None when the
    process is not part of a multi-process launch.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = None
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout, store=_elastic_store(timeout),
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return device or torch.device("cpu")


def _elastic_store(timeout: datetime.timedelta) -> dist.Store:
    """The store of a torchrun worker, with keys private to this restart attempt.

    torchrun's workers reach the agent's TCPStore, which outlives restarts; without a per-attempt
    prefix the process group of a restarted round finds the previous round's keys (the dead
    ranks' gloo addresses) and a rank that reads them before its peer overwrites them connects
    to a closed port ("Connection refused" in connectFullMesh).
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts and rank == 0, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"sae-forge/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}/", store)


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce (sum, avg via sum/world, max or min)."""
    if not is_distributed():
        return t
    W = world_size()
    STATS.add(t, 2 * (W - 1) / W)  # ring all-reduce traffic per rank
    if op in ("max", "min"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "avg":
            t /= W
    return t


def all_to_all(tensors: list[Tensor]) -> list[Tensor]:
    """Send ``tensors[s]`` to rank ``s``; returns the tensors every rank sent here, by rank.
    All tensors must have one shape (gloo's all-to-all needs it)."""
    if not is_distributed():
        return list(tensors)
    W = world_size()
    if len(tensors) != W:
        raise ValueError(f"all_to_all needs one tensor per rank ({W}), got {len(tensors)}")
    out = [torch.empty_like(t) for t in tensors]
    STATS.add(tensors[0], W - 1)
    dist.all_to_all(out, [t.contiguous() for t in tensors])
    return out


def all_gather_stack(t: Tensor) -> Tensor:
    """[W, *t.shape]: every rank's tensor (all the same shape)."""
    if not is_distributed():
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(world_size())]
    STATS.add(t, world_size() - 1)
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def all_gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows of ``t`` [N_r, ...] (the counts may differ), concatenated in rank order."""
    if not is_distributed():
        return t
    counts = all_gather_stack(torch.tensor([t.shape[0]], device=t.device)).flatten().tolist()
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    return torch.cat([part[:n] for part, n in zip(all_gather_stack(padded), counts)])


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    if is_distributed():
        STATS.add(t)
        dist.broadcast(t, src)
    return t


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's (picklable, trusted: produced by this run) object, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


class _ReduceFromParallel(torch.autograd.Function):
    """Forward: sum partial results over ranks. Backward: each rank's share is the full grad."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return all_reduce_(t.clone())

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


class _CopyToParallel(torch.autograd.Function):
    """Forward: identity (the input is replicated). Backward: sum the per-rank gradients."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return all_reduce_(g.clone())


def reduce_from_parallel(t: Tensor) -> Tensor:
    return _ReduceFromParallel.apply(t) if is_distributed() else t


def copy_to_parallel(t: Tensor) -> Tensor:
    return _CopyToParallel.apply(t) if is_distributed() else t
