"""Training a cross-layer transcoder: a synthetic two-layer toy, and one harvest -> sae-train sae=clt."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sae.buffer.clt_source import build_clt_source, clt_hookpoints
from sae.models import SAEConfig, build_sae
from sae.runners.config import compose_train_config
from sae.runners.train import run_training
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer

F, M = 24, 16  # true features per layer, d_model


def two_layer_toy(n_rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse features s0, s1; MLP inputs x_i = s_i A_i; outputs y0 = s0 P00, y1 = s0 P01 + s1 P11 (layer 1's
    output also carries layer 0's features: a cross-layer path a per-layer transcoder could not see from x1)."""
    g = torch.Generator().manual_seed(seed)

    def feats():
        on = torch.rand(n_rows, F, generator=g) < 0.08
        return on * (0.5 + torch.rand(n_rows, F, generator=g))

    def dirs():
        d = torch.randn(F, M, generator=g)
        return d / d.norm(dim=1, keepdim=True)

    s0, s1 = feats(), feats()
    A0, A1, P00, P01, P11 = (dirs() for _ in range(5))
    return torch.cat([s0 @ A0, s1 @ A1], 1), torch.cat([s0 @ P00, s0 @ P01 + s1 @ P11], 1)


@pytest.mark.slow
@pytest.mark.parametrize("act", ["topk", "jumprelu"])
def test_training_on_a_two_layer_toy_reduces_the_loss(act, tmp_path):
    x, y = two_layer_toy(8192)
    extra = {"l0_coefficient": 0.01, "sparsity_warmup_steps": 20} if act == "jumprelu" else {}
    cfg = SAEConfig(architecture="clt", clt_layers=2, clt_activation=act, num_latents=48, k=4, transcode=True,
                    **extra)
    clt = build_sae(cfg, 2 * M, seed=0)
    tc = TrainConfig(batch_size=256, steps=100, lr=1e-2, lr_warmup_steps=5, progress=False, log_every=1,
                     dead_tokens_threshold=4096, out_dir=str(tmp_path / act), eval_every=0, final_report=False)
    losses = []
    trainer = Trainer(tc, {"clt": clt}, (x, y))
    trainer.step_hooks.append(lambda t: losses.append(t.last_metrics["train/fvu/clt"]))
    last = trainer.fit()
    first = sum(losses[:3]) / 3
    final = sum(losses[-10:]) / 10
    assert final < 0.35 * first, (act, first, final)
    assert last["train/fvu/layer1/clt"] < 0.35 and last["train/fvu/layer0/clt"] < 0.35, last
    assert 2 <= last["train/l0/clt"] <= 32  # topk: k = 4 per layer; jumprelu: set by its L0 penalty


@pytest.fixture(scope="module")
def buffer(tmp_path_factory, tiny_gpt2, harvest_mlps):
    """One harvest of both layers' MLP inputs and outputs of the tiny GPT-2 (2 layers, d_model 32)."""
    root = tmp_path_factory.mktemp("clt")
    docs = root / "docs.txt"
    docs.write_text("".join(f"Line {i}: a set keeps {i % 11} unique items in no order.\n" for i in range(400)))
    return harvest_mlps(tiny_gpt2, docs, root / "buf")


def test_the_source_concatenates_rows_of_the_same_tokens(buffer):
    from sae.buffer.config import DataConfig
    from sae.buffer.manifest import read_manifest
    from sae.buffer.reader import map_shard

    data = DataConfig(source="buffer")
    data.buffer.path = str(buffer)
    src = build_clt_source(data, 128)
    assert src.layers == [0, 1] and src.d_in == src.d_out == 64
    batch = next(iter(src))
    assert batch.x.shape == (128, 64) and batch.y.shape == (128, 64)
    # Find each row's (shard, row) in the buffer, per hook point: the four blocks come from one token
    # (a repeated context gives equal rows at several places: the places must share one).
    m = read_manifest(buffer)
    where: dict[str, dict[bytes, set]] = {}
    for hp in ("layers.0.mlp_in", "layers.1.mlp_in", "layers.0.mlp", "layers.1.mlp"):
        where[hp] = {}
        for s, shard in enumerate(m["shards"]):
            rows = map_shard(buffer / shard["files"][hp]["path"], shard["files"][hp], verify=False)
            for r in range(rows.shape[0]):
                where[hp].setdefault(rows[r].numpy().tobytes(), set()).add((s, r))
    blocks = {"layers.0.mlp_in": batch.x[:, :32], "layers.1.mlp_in": batch.x[:, 32:],
              "layers.0.mlp": batch.y[:, :32], "layers.1.mlp": batch.y[:, 32:]}
    common = [set.intersection(*(where[hp][b[i].numpy().tobytes()] for hp, b in blocks.items())) for i in range(128)]
    assert all(common)
    assert sum(len(c) == 1 for c in common) > 64  # most rows are unique: the check has teeth


def test_sae_train_clt_from_one_harvest(buffer, tmp_path):
    run = compose_train_config(["sae=clt", "data=buffer", f"data.buffer.path={buffer}", "train=smoke",
                                "train.steps=40", "train.batch_size=256", "train.progress=false", "train.log_every=5",
                                f"train.out_dir={tmp_path / 'run'}", "sae.k=4", "sae.expansion_factor=2"])
    result = run_training(run)
    cfg = json.loads((result.final_dirs["clt"] / "cfg.json").read_text())
    assert cfg["d_in"] == cfg["d_out"] == 64 and cfg["num_latents"] == 128 and cfg["sae"]["clt_layers"] == 2
    assert cfg["clt"]["inputs"] == ["layers.0.mlp_in", "layers.1.mlp_in"]
    assert cfg["clt"]["targets"] == ["layers.0.mlp", "layers.1.mlp"]
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fvu = [r["train/fvu/clt"] for r in rows if "train/fvu/clt" in r]
    assert fvu[-1] < 0.8 * fvu[0], fvu
    assert rows[-1]["train/fvu/layer0/clt"] + rows[-1]["train/fvu/layer1/clt"] == pytest.approx(fvu[-1])
    assert 7.5 < result.eval_metrics["clt"]["l0"] <= 8.0  # k = 4 per layer, 2 layers (a few top-k values <= 0)
    assert result.eval_metrics["clt"]["fvu"] < 0.8


def test_a_layer_without_both_hook_points_is_a_clear_error(buffer, tmp_path):
    held = ["layers.0.mlp_in", "layers.0.mlp", "layers.1.mlp_in", "layers.2.mlp"]
    with pytest.raises(ValueError, match=r"lacks layers\.1\.mlp(?!_).*layers\.\*\.mlp_in"):
        clt_hookpoints(held, [])
    assert clt_hookpoints(held, ["layers.0"]) == [0]
    with pytest.raises(ValueError, match=r"lacks layers\.2\.mlp_in"):
        clt_hookpoints(held, ["layers.0.mlp", "layers.2"])
    with pytest.raises(ValueError, match="'layers.0.attn' is not a layer"):
        clt_hookpoints(held, ["layers.0.attn"])
    run = compose_train_config(["sae=clt", "data=buffer", f"data.buffer.path={buffer}", "data.hookpoints=[layers.0,"
                                "layers.3]", "train=smoke", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"lacks layers\.3\.mlp_in, layers\.3\.mlp"):
        run_training(run)
    assert not (tmp_path / "run").exists()


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(buffer, tmp_path):
    from sae.buffer.config import DataConfig

    def trainer(out):
        data = DataConfig(source="buffer")
        data.buffer.path = str(buffer)
        clt = build_sae(SAEConfig(architecture="clt", clt_layers=2, clt_activation="batchtopk", num_latents=64, k=4,
                                  transcode=True), 64, seed=0)
        cfg = TrainConfig(batch_size=128, steps=12, lr=3e-3, lr_warmup_steps=2, progress=False, log_every=4,
                          dead_tokens_threshold=512, checkpoint_every=5, out_dir=str(out), eval_every=0)
        return Trainer(cfg, {"clt": clt}, build_clt_source(data, 128))

    straight = trainer(tmp_path / "straight")
    straight.fit()
    killed = trainer(tmp_path / "resumed")  # as if killed after step 7: steps 6-7 are lost
    batches = iter(killed.source)
    while killed.step < 7:
        batch = next(batches)
        if killed.step == 0:
            killed.init_from_data(batch)
        killed.train_step(batch)
        if killed.step % 5 == 0:
            killed.save_checkpoint()
    resumed = trainer(tmp_path / "resumed")
    resumed.fit()
    assert resumed.step == 12
    for (name, a), (_, b) in zip(straight.saes["clt"].state_dict().items(), resumed.saes["clt"].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after resume")


def test_sae_train_clt_live_without_a_buffer(tiny_gpt2, tmp_path):
    """data=live: every layer's MLP input and output harvested while training; each batch is the
    paired live source's rows, inputs then targets, normalised per hook point."""
    from sae.buffer.live import LiveSource
    from sae.train.multi_source import LiveHookpoints

    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"Line {i}: a set keeps {i % 11} unique items in no order.\n" for i in range(400)))
    common = ["data=live", f"data.live.model.name={tiny_gpt2}", f"data.live.text.name={docs}",
              "data.live.text.context_length=32", "data.live.heldout_contexts=16"]
    run = compose_train_config(["sae=clt", *common, "train=smoke", "train.steps=40", "train.batch_size=256",
                                "train.progress=false", "train.log_every=5", f"train.out_dir={tmp_path / 'run'}",
                                "sae.k=4", "sae.expansion_factor=2"])
    data = dataclasses.replace(run.data, normalize="scale")  # what the runner makes of auto for a CLT
    clt_src = build_clt_source(data, 64)
    pairs = LiveHookpoints(LiveSource(data.live, 64, hookpoints=["layers.*.mlp_in"], target_hookpoints=["layers.*.mlp"],
                                      normalize="scale"))
    got, want = next(iter(clt_src)), next(iter(pairs))
    torch.testing.assert_close(got.x, torch.cat([want["layers.0.mlp_in"].x, want["layers.1.mlp_in"].x], 1))
    torch.testing.assert_close(got.y, torch.cat([want["layers.0.mlp_in"].y, want["layers.1.mlp_in"].y], 1))
    result = run_training(run)
    cfg = json.loads((result.final_dirs["clt"] / "cfg.json").read_text())
    assert cfg["clt"]["inputs"] == ["layers.0.mlp_in", "layers.1.mlp_in"] and cfg["sae"]["clt_layers"] == 2
    assert [set(p) for p in cfg["normalization"]["per_layer"]] == [{"x", "y"}] * 2
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fvu = [r["train/fvu/clt"] for r in rows if "train/fvu/clt" in r]
    assert fvu[-1] < 0.8 * fvu[0], fvu
    assert result.eval_metrics["clt"]["fvu"] < 0.8
    bad = compose_train_config(["sae=clt", *common, "data.hookpoints=[layers.0.attn]", "train=smoke",
                                f"train.out_dir={tmp_path / 'bad'}"])
    with pytest.raises(ValueError, match="'layers.0.attn' is not a layer"):
        run_training(bad)
