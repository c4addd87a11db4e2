"""Latent-parallel cross-layer transcoders with 2 gloo processes: exact global selection per layer."""

from __future__ import annotations

import json

import clt_workers as C
import pytest
import torch
from safetensors.torch import load_file
from test_strategies import assert_close_state, spawn
from workers import train_cfg

from sae.models import SAEConfig, build_sae
from sae.train.clt_parallel import consolidate, shard_clt
from sae.train.reshard import consolidate_sae, reshard_checkpoint
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
        # sae-export and `python -m sae.train.reshard consolidate` join CLT shards through the same code.
        assert_close_state(consolidate_sae(tmp_path / name / "final" / "clt").state_dict(), full.state_dict(),
                           atol=0, rtol=0)
    ckpt = sorted((tmp_path / "topk" / "checkpoints").glob("step_*"))[-1]
    with pytest.raises(ValueError, match="cross-layer transcoder: resharding its checkpoints .* not supported yet"):
        reshard_checkpoint(ckpt, tmp_path / "resharded", 1)
    assert not (tmp_path / "resharded").exists() or not any((tmp_path / "resharded").rglob("*.safetensors"))
    # Data parallel on 2 x 128 rows equals one process on the 256-row union (TopK: a per-token selection).
    ref = Trainer(train_cfg(tmp_path / "ref_data", steps, 256, dead_tokens_threshold=256),
                  {"clt": C.make_clt("topk")}, (x, y))
    ref.fit()
    got = load_file(str(tmp_path / "data.safetensors"))
    assert_close_state(got, {f"clt.{k}": v for k, v in ref.saes["clt"].state_dict().items()}, atol=2e-5, rtol=1e-4)


def test_a_shard_may_hold_fewer_latents_than_k_and_uneven_splits_name_the_fix():
    full = build_sae(SAEConfig(architecture="clt", clt_layers=2, num_latents=16, k=8, transcode=True), 8, 8, seed=0)
    part = shard_clt(full, 1, 2)  # 8 latents per layer on this rank, k = 8 over both ranks
    assert part.latents_per_layer == 8 and part.k == 8 and part.full_latents_per_layer == 16
    torch.testing.assert_close(part.W_enc, full.W_enc[:, 8:])
    with pytest.raises(ValueError, match=r"latents per layer \(16: sae.num_latents.*choose a multiple of 3"):
        shard_clt(full, 0, 3)
