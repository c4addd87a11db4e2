"""Shared fixtures: small synthetic data and quick SAE training for CPU tests."""

from __future__ import annotations

import os

import pytest
import torch

# Tests run the eager kernels unless a test forces Triton (see tests/kernels).
os.environ.setdefault("SAE_KERNEL_BACKEND", "eager")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path / "run"
