"""Shared fixtures: small synthetic data and quick SAE training for CPU tests."""

from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when it is first imported (its own tl helpers are jit functions),
# and some libraries the tests import (torch._dynamo through transformers) import triton early:
# set it before anything else so the kernel tests (tests/kernels) run in the interpreter on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests run the eager kernels unless a test forces Triton (see tests/kernels).
os.environ.setdefault("SAE_KERNEL_BACKEND", "eager")
# sae.selection_dtype=auto means fp32 in tests whatever the CI machine's CPU (AVX2-only or with
# bf16 units), so figures and tolerances do not change with the machine; tests/models/test_precision.py
# covers the hardware decision itself.
os.environ.setdefault("SAE_AUTO_DTYPE", "float32")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path / "run"


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer, hidden-32 GPT-2 with random weights saved as a local HF folder (one per session)."""
    from sae.harvest.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_gpt2") / "model", "gpt2", layers=2, hidden=32)


@pytest.fixture(scope="session")
def harvest_mlps():
    """``harvest_mlps(model, docs, out)``: one harvest of every layer's MLP input and output (what a
    cross-layer transcoder trains on) of ``model`` over the text file ``docs``, into ``out``."""
    def harvest(model, docs, out):
        from sae.runners.config import compose_harvest_config
        from sae.runners.harvest import harvest_to_buffer

        h = compose_harvest_config([f"model.name={model}", f"text.name={docs}", "text.context_length=32",
                                    "harvest.progress=false", f"writer.out_dir={out}", "writer.shard_tokens=1024",
                                    "hookpoints=[layers.*.mlp_in,layers.*.mlp]"])
        harvest_to_buffer(h.model, h.text, h.harvest, h.writer, h.hookpoints)
        return out

    return harvest
