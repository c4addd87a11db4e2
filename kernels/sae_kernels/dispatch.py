"""Backend choice for the sparse ops, in one place.

``auto`` picks Triton for CUDA tensors (when Triton imports) and the eager PyTorch path
otherwise. ``SAE_KERNEL_BACKEND=triton|eager|auto`` overrides it; tests force ``triton`` on CPU
tensors together with ``TRITON_INTERPRET=1`` to run the kernels in Triton's interpreter.
A fallback from a requested/expected Triton path to eager warns once.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)

ENV_VAR = "SAE_KERNEL_BACKEND"


class Backend(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    EAGER = "eager"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _warn_once(msg: str) -> None:
    log.warning(msg)


def requested_backend() -> Backend:
    raw = os.environ.get(ENV_VAR, "auto").strip().lower()
    try:
        return Backend(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={raw!r} is not a backend; use one of auto, triton, eager") from None


def resolve_backend(device: torch.device) -> Backend:
    """Return ``TRITON`` or ``EAGER`` for tensors on ``device``.

    Raises:
        RuntimeError: Triton was forced but cannot run on ``device``.
    """
    req = requested_backend()
    if req is Backend.EAGER:
        return Backend.EAGER
    can_triton = triton_available() and (device.type == "cuda" or triton_interpreting())
    if req is Backend.TRITON:
        if not can_triton:
            raise RuntimeError(
                f"{ENV_VAR}=triton but Triton cannot run on device {device}: "
                "use CUDA tensors, or set TRITON_INTERPRET=1 for CPU tensors"
            )
        return Backend.TRITON
    if device.type == "cuda":
        if can_triton:
            return Backend.TRITON
        _warn_once("Triton is not importable; sparse ops on CUDA fall back to the eager path")
    return Backend.EAGER


CPUINFO = "/proc/cpuinfo"


def _cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX-BF16 on this CPU (torch's own probes, else /proc/cpuinfo's flags)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(p) for p in probes):
        return any(bool(p()) for p in probes)
    try:
        with open(CPUINFO) as fh:
            flags = fh.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: CUDA compute capability 8.0+
    (Ampere, Hopper, Blackwell), or a CPU with AVX512-BF16 or AMX. Elsewhere bf16 GEMMs are
    emulated and slower than fp32 (about 7x measured on an AVX2-only CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return _cpu_has_bf16_units()
    return False
