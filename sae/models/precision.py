"""Precision defaults decided from the hardware at run time.

``sae.selection_dtype=auto`` (the default of the TopK family) selects latents from bf16
pre-activations where the device multiplies bf16 matrices natively (CUDA compute capability
8.0+, CPUs with AVX512-BF16 or AMX) and from fp32 elsewhere: on an AVX2-only CPU a bf16 GEMM is
emulated and made the step 4.7x slower. The selected values are recomputed in fp32 either way
(see :class:`sae.models.topk.TopKSAE`). An explicit ``float32`` or ``bfloat16`` always wins, and
``train.deterministic=true`` turns ``auto`` into ``float32``.

``SAE_AUTO_DTYPE=float32|bfloat16`` pins what ``auto`` means regardless of the hardware (the test
suite pins float32 so that its figures do not depend on the CI machine's CPU).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from sae_kernels.dispatch import native_bf16_matmul

log = logging.getLogger(__name__)

AUTO_ENV_VAR = "SAE_AUTO_DTYPE"
SELECTION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SELECTION_SETTINGS = ("auto", *SELECTION_DTYPES)


def reusable(t: torch.Tensor | None, shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``t`` if it can be reused as a buffer of ``shape``/``dtype``/``device``, else a new one.

    Never hands out an inference tensor outside ``torch.inference_mode``: a buffer first made
    under it (the first encode in a spliced evaluation) could not be written outside it (a later
    encode, an optimiser step), so it is replaced then; new buffers are normal tensors."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if t is not None and tuple(t.shape) == tuple(shape) and t.dtype == dtype and t.device == device and \
            not (t.is_inference() and not torch.is_inference_mode_enabled()):
        return t
    with torch.inference_mode(False):
        return torch.empty(shape, dtype=dtype, device=device)


def validate_selection_dtype(setting: str) -> None:
    if setting not in SELECTION_SETTINGS:
        raise ValueError(f"sae.selection_dtype={setting!r}; use one of {', '.join(SELECTION_SETTINGS)}")


@functools.cache
def _announce(device: str, message: str) -> None:
    log.info("precision on %s: %s", device, message)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    return device.type


def auto_selection_dtype(device: torch.device) -> torch.dtype:
    """What ``auto`` resolves to on ``device``; says so once per device."""
    pinned = os.environ.get(AUTO_ENV_VAR, "").strip().lower()
    if pinned:
        if pinned not in SELECTION_DTYPES:
            raise ValueError(f"{AUTO_ENV_VAR}={pinned!r}; use float32 or bfloat16")
        _announce(str(device), f"sae.selection_dtype=auto is {pinned} ({AUTO_ENV_VAR} is set)")
        return SELECTION_DTYPES[pinned]
    if native_bf16_matmul(device):
        _announce(str(device), f"{_device_name(device)} multiplies bf16 natively: latents are selected from bf16 "
                  "pre-activations, values and gradients stay fp32 (sae.selection_dtype=float32 or "
                  "train.deterministic=true for exact fp32 selection)")
        return torch.bfloat16
    _announce(str(device), f"{_device_name(device)} has no native bf16 matrix units: latents are selected from "
              "fp32 pre-activations")
    return torch.float32


def resolve_selection_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype latents are selected in for ``sae.selection_dtype=setting`` on ``device``."""
    validate_selection_dtype(setting)
    if setting == "auto":
        return auto_selection_dtype(device)
    return SELECTION_DTYPES[setting]


class WeightCopy:
    """A lower-precision copy of a parameter, reused only while a trusted writer vouches for it.

    Not every in-place update is visible from outside: ``torch.optim.Adam(fused=True)`` changes
    parameters without bumping their version counters. So :meth:`get` casts afresh on every call,
    unless the last writer of the parameter also wrote this copy and said so with
    :meth:`mark_fresh` (the fused optimiser step does, in the same kernel that updates the
    parameter); that vouching holds while the parameter's storage, shape and version counter are
    those it saw (``load_state_dict``, ``mul_`` and the like bump the counter).
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.tensor: torch.Tensor | None = None
        self._fresh: tuple | None = None

    @staticmethod
    def _stamp_of(p: torch.Tensor) -> tuple:
        return p.data_ptr(), p._version, tuple(p.shape), p.device

    def get(self, p: torch.Tensor) -> torch.Tensor:
        """The copy of ``p``: the vouched-for one, or a cast made now."""
        if self._fresh is None or self._fresh != self._stamp_of(p):
            self._fresh = None
            self.buffer(p).copy_(p.detach())
        return self.tensor

    def buffer(self, p: torch.Tensor) -> torch.Tensor:
        """Storage for the copy, shaped like ``p`` (for a writer that fills it)."""
        self.tensor = reusable(self.tensor, p.shape, self.dtype, p.device)
        return self.tensor

    def mark_fresh(self, p: torch.Tensor) -> None:
        """Vouch that the copy holds ``p`` as it is now (call right after writing both)."""
        self._fresh = self._stamp_of(p)
