"""Latent-parallel cross-layer transcoders with 2 gloo processes: exact global selection per layer."""

from __future__ import annotations

import json

import clt_workers as C
import pytest
import torch
from safetensors.torch import load_file
from test_strategies import assert_close_state, spawn
from workers import train_cfg

from sae.train.clt_parallel import consolidate
from sae.train.trainer import Trainer

pytestmark = pytest.mark.distributed


def test_sharded_clt_init_forward_and_backward_equal_one_process(tmp_path):
    """TopK, the acausal crosscoder, BatchTopK and JumpReLU, with AuxK on dead latents of both shards."""
    spawn(C.forward_check, str(tmp_path))
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def test_latent_and_data_parallel_training_match_one_process(tmp_path):
    steps = 6
    spawn(C.train_run, str(tmp_path), steps)
    losses = json.loads((tmp_path / "losses.json").read_text())
    x, y = C.data(2048, seed=1)
    for act, acausal in C.CASES:
        name = f"{act}{'_acausal' if acausal else ''}"
        ref = Trainer(train_cfg(tmp_path / f"ref_{name}", steps, 128, dead_tokens_threshold=256),
                      {"clt": C.make_clt(act, acausal)}, (x, y))
        rows = []
        ref.step_hooks.append(lambda t, rows=rows: rows.append(t.last_metrics["train/loss/clt"]))
        ref.fit()
        assert losses[name] == pytest.approx(rows, rel=1e-5), name
        full = consolidate(tmp_path / name / "final" / "clt")
        assert [tuple(w.shape) for w in full.W_dec] == [tuple(w.shape) for w in ref.saes["clt"].W_dec]
        assert_close_state(full.state_dict(), ref.saes["clt"].state_dict(), atol=2e-5, rtol=1e-4)
        assert float(torch.stack([p.detach().abs().sum() for p in full.W_dec]).sum()) > 0
    # Data parallel on 2 x 128 rows equals one process on the 256-row union (TopK: a per-token selection).
    ref = Trainer(train_cfg(tmp_path / "ref_data", steps, 256, dead_tokens_threshold=256),
                  {"clt": C.make_clt("topk")}, (x, y))
    ref.fit()
    got = load_file(str(tmp_path / "data.safetensors"))
    assert_close_state(got, {f"clt.{k}": v for k, v in ref.saes["clt"].state_dict().items()}, atol=2e-5, rtol=1e-4)
