"""Kernel tests run the Triton kernels on CPU tensors in Triton's interpreter (STYLE 15).

``triton.jit`` reads ``TRITON_INTERPRET`` when a function is decorated, and triton.language's own
helpers (``tl.zeros``, ``tl.sum``) are decorated when triton is first imported; so the variable is
set here, at collection, before anything in these tests imports triton, not per test. For the rest
of the session ``SAE_KERNEL_BACKEND=triton`` on CPU tensors then runs interpreted instead of
raising; the ``auto`` and ``eager`` backends are unaffected (``auto`` picks Triton only for CUDA).
"""

import importlib
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_ops(monkeypatch):
    """Route the sparse ops through Triton (interpreted) for one test; return ``sae_kernels.triton_ops``."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SAE_KERNEL_BACKEND", "triton")
    mod = importlib.import_module("sae_kernels.triton_ops")
    if not mod.INTERPRETED:  # imported earlier without TRITON_INTERPRET: re-decorate the kernels
        mod = importlib.reload(mod)
    if not (mod.INTERPRETED and mod.LANG_INTERPRETED):
        pytest.fail("triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; "
                    "run `TRITON_INTERPRET=1 pytest ...`")
    return mod
