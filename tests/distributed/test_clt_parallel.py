"""Latent-parallel cross-layer transcoders with 2 gloo processes: exact global selection per layer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import clt_workers as C
import pytest
import torch
from safetensors.torch import load_file
from test_strategies import assert_close_state, spawn
from workers import train_cfg

from sae.models import SAEConfig, build_sae
from sae.train.reshard import reshard_checkpoint
from sae.train.shards import consolidate_sae
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
        full = consolidate_sae(tmp_path / name / "final" / "clt")
        assert [tuple(w.shape) for w in full.W_dec] == [tuple(w.shape) for w in ref.saes["clt"].W_dec]
        assert_close_state(full.state_dict(), ref.saes["clt"].state_dict(), atol=2e-5, rtol=1e-4)
        assert float(torch.stack([p.detach().abs().sum() for p in full.W_dec]).sum()) > 0
    _reshard_and_resume(tmp_path, steps, x, y)
    # Data parallel on 2 x 128 rows equals one process on the 256-row union (TopK: a per-token selection).
    ref = Trainer(train_cfg(tmp_path / "ref_data", steps, 256, dead_tokens_threshold=256),
                  {"clt": C.make_clt("topk")}, (x, y))
    ref.fit()
    got = load_file(str(tmp_path / "data.safetensors"))
    assert_close_state(got, {f"clt.{k}": v for k, v in ref.saes["clt"].state_dict().items()}, atol=2e-5, rtol=1e-4)


def _reshard_and_resume(tmp_path, steps, x, y):
    """The 2-rank TopK CLT checkpoint resharded to one process resumes as one process would have
    trained (weights, Adam moments and per-layer dead counters, with AuxK active); through 4 ranks
    and back it is unchanged; an uneven split names the fix and writes nothing."""
    ckpt = sorted((tmp_path / "topk" / "checkpoints").glob("step_*"))[-1]
    assert ckpt.name == f"step_{steps:08d}"
    reshard_checkpoint(ckpt, tmp_path / "one", 1)
    more = steps + 4
    resumed = Trainer(train_cfg(tmp_path / "one", more, 128, dead_tokens_threshold=256), {"clt": C.make_clt("topk")},
                      (x, y))
    resumed.fit()
    for n in (steps, more):  # one process, interrupted at the same step (the LR schedule depends on train.steps)
        ref = Trainer(train_cfg(tmp_path / "ref_more", n, 128, dead_tokens_threshold=256), {"clt": C.make_clt("topk")},
                      (x, y))
        ref.fit()
    assert resumed.step == more and int(ref.trackers["clt"].dead_mask.sum()) > 0  # AuxK was on
    assert_close_state(resumed.saes["clt"].state_dict(), ref.saes["clt"].state_dict(), atol=2e-5, rtol=1e-4)

    four = reshard_checkpoint(ckpt, tmp_path / "four", 4)
    assert sorted(p.name for p in (four / "clt").iterdir()) == [f"shard_{r:02d}_of_04" for r in range(4)]
    back = reshard_checkpoint(four, tmp_path / "back", 1)
    direct = tmp_path / "one" / "checkpoints" / ckpt.name
    assert_close_state(load_file(str(back / "clt" / "sae.safetensors")),
                       load_file(str(direct / "clt" / "sae.safetensors")), atol=0, rtol=0)
    a, b = (torch.load(d / "trainer_state_rank0.pt", weights_only=True) for d in (back, direct))
    assert torch.equal(a["trackers"]["clt"]["tokens_since_fired"], b["trackers"]["clt"]["tokens_since_fired"])
    for i, st in b["optimizers"]["clt"]["state"].items():
        for key, v in st.items():
            assert torch.equal(a["optimizers"]["clt"]["state"][i][key], v), (i, key)
    # Dead counters: [layer, latent] on each rank (all 0 in this short run, so give them distinct values).
    marked = tmp_path / "marked" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, marked)
    per_rank = [torch.arange(C.N * C.L // 2).view(C.N, -1) + 1000 * r for r in range(2)]
    for r, counts in enumerate(per_rank):
        st = torch.load(marked / f"trainer_state_rank{r}.pt", weights_only=True)
        st["trackers"]["clt"]["tokens_since_fired"] = counts.reshape(-1).clone()
        torch.save(st, marked / f"trainer_state_rank{r}.pt")
    full = torch.cat(per_rank, 1)  # [layer, all 16 latents]
    for world in (1, 4):
        out = reshard_checkpoint(marked, tmp_path / f"marked_{world}", world)
        for r, want in enumerate(full.chunk(world, 1)):
            got = torch.load(out / f"trainer_state_rank{r}.pt", weights_only=True)["trackers"]["clt"]
            assert torch.equal(got["tokens_since_fired"], want.reshape(-1)), (world, r)
    # run.json follows the checkpoint (also given as a path relative to its folder), for the new
    # world size; a folder holding another run is refused before anything is written.
    cwd = os.getcwd()
    try:
        os.chdir(ckpt.parent)
        reshard_checkpoint(Path(ckpt.name), tmp_path / "rel", 1)
    finally:
        os.chdir(cwd)
    source = json.loads((tmp_path / "topk" / "run.json").read_text())
    assert source["world_size"] == 2 and source["strategy"] == "latent"
    assert json.loads((tmp_path / "rel" / "run.json").read_text()) == {**source, "world_size": 1, "strategy": "none"}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text(json.dumps({**source, "batch_size": 64}))
    with pytest.raises(ValueError, match=r"holds a different run; it differs in: batch_size: 64 -> 128"):
        reshard_checkpoint(ckpt, tmp_path / "other", 1)
    assert not (tmp_path / "other" / "checkpoints").exists()
    with pytest.raises(ValueError, match=r"16 latents per layer .* 3 ranks; choose a world size that divides 16"):
        reshard_checkpoint(ckpt, tmp_path / "three", 3)
    assert not (tmp_path / "three").exists()


def test_a_shard_may_hold_fewer_latents_than_k_and_uneven_splits_name_the_fix():
    full = build_sae(SAEConfig(architecture="clt", clt_layers=2, num_latents=16, k=8, transcode=True), 8, 8, seed=0)
    part = full.latent_shard(1, 2)  # 8 latents per layer on this rank, k = 8 over both ranks
    assert part.latents_per_layer == 8 and part.k == 8 and part.full_latents_per_layer == 16
    torch.testing.assert_close(part.W_enc, full.W_enc[:, 8:])
    with pytest.raises(ValueError, match=r"latents per layer \(16: sae.num_latents.*choose a multiple of 3"):
        full.latent_shard(0, 3)
