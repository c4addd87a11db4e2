"""``data.hookpoints``: one SAE per hook point from one harvest (live) or one buffer, single process.

The 2-process hook-point-parallel runs (each rank gets its own hook points) are in
tests/distributed/test_hookpoint_parallel.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from sae.buffer.live import LiveSource
from sae.runners.config import compose_harvest_config, compose_train_config
from sae.runners.harvest import harvest_to_buffer
from sae.runners.train import run_training
from sae.train.multi_source import LiveHookpoints


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_gpt2):
    docs = tmp_path_factory.mktemp("hp") / "docs.txt"
    docs.write_text("".join(f"Line {i}: a list keeps {i % 13} items in order.\n" for i in range(300)))
    return tiny_gpt2, docs


def _live(model, docs, **kw) -> LiveSource:
    from sae.buffer.config import LiveConfig

    cfg = LiveConfig()
    cfg.model.name, cfg.text.name, cfg.text.context_length = str(model), str(docs), 32
    cfg.heldout_contexts = 8
    return LiveSource(cfg, 64, **kw)


def test_live_rows_of_several_hookpoints_equal_single_hookpoint_harvests(assets):
    model, docs = assets
    both = LiveHookpoints(_live(model, docs, hookpoints=["layers.0", "layers.1"], normalize="scale"))
    alone = {hp: _live(model, docs, hookpoint=hp, normalize="scale") for hp in ("layers.0", "layers.1")}
    assert both.hookpoints == ["layers.0", "layers.1"] and both.dims == {"layers.0": 32, "layers.1": 32}
    for step, (multi, *singles) in enumerate(zip(both, alone["layers.0"], alone["layers.1"])):
        for hp, single in zip(("layers.0", "layers.1"), singles):
            torch.testing.assert_close(multi[hp].x, single.x)  # same rows, same order, same normalisation
        if step == 3:
            break
    held = both.heldout_batches(2)
    torch.testing.assert_close(held["layers.1"][0].x, alone["layers.1"].heldout_batches(1)[0].x)


def test_one_sae_per_hookpoint_from_a_live_harvest(assets, tmp_path):
    model, docs = assets
    run = compose_train_config(["data=live", f"data.live.model.name={model}", f"data.live.text.name={docs}",
                                "data.live.text.context_length=32", "data.hookpoints=[layers.0,layers.1]",
                                "data.live.heldout_contexts=16", "data.normalize=scale",
                                "train=smoke", "train.steps=6", "train.batch_size=128", "train.progress=false",
                                f"train.out_dir={tmp_path / 'sae'}", "sae.k=4", "sae.expansion_factor=2",
                                "+variants={k2: {k: 2}}"])
    result = run_training(run)
    names = {"topk@layers.0", "topk@layers.1", "k2@layers.0", "k2@layers.1"}
    assert set(result.final_dirs) == names == set(result.eval_metrics)
    for name in names:
        cfg = json.loads((result.final_dirs[name] / "cfg.json").read_text())
        hp = name.split("@")[1]
        assert cfg["data"]["hookpoint"] == hp and cfg["data"]["hookpoints"] == []  # reads as a single-hook SAE
        assert cfg["normalization"]["x"]["mode"] == "scale"
        assert result.eval_metrics[name]["l0"] <= (4 if name.startswith("topk") else 2) + 1e-6
        assert result.eval_metrics[name]["fvu"] < 1.5
    scales = {json.loads((result.final_dirs[f"topk@{hp}"] / "cfg.json").read_text())["normalization"]["x"]["scale"]
              for hp in ("layers.0", "layers.1")}
    assert len(scales) == 2  # each hook point normalised by its own statistics


def _harvest(model, docs, out, hookpoints: str) -> None:
    h = compose_harvest_config([f"model.name={model}", f"text.name={docs}", "text.context_length=32",
                                "harvest.progress=false", f"writer.out_dir={out}", "writer.shard_tokens=1024",
                                f"hookpoints={hookpoints}"])
    harvest_to_buffer(h.model, h.text, h.harvest, h.writer, h.hookpoints)


def test_one_sae_per_hookpoint_from_a_buffer(assets, tmp_path):
    model, docs = assets
    _harvest(model, docs, tmp_path / "buf", "[layers.0,layers.1]")
    run = compose_train_config(["data=buffer", f"data.buffer.path={tmp_path / 'buf'}",
                                "data.hookpoints=[layers.0,layers.1]", "train=smoke", "train.steps=5",
                                "train.batch_size=128", "train.progress=false", f"train.out_dir={tmp_path / 'sae'}",
                                "sae.k=4", "sae.expansion_factor=2"])
    result = run_training(run)
    assert set(result.final_dirs) == {"topk@layers.0", "topk@layers.1"}
    for hp in ("layers.0", "layers.1"):
        assert json.loads((result.final_dirs[f"topk@{hp}"] / "cfg.json").read_text())["data"]["hookpoint"] == hp


def test_bad_hookpoints_are_named(assets, tmp_path):
    model, docs = assets
    run = compose_train_config(["data=live", f"data.live.model.name={model}", f"data.live.text.name={docs}",
                                "data.hookpoints=[layers.0]", "data.target_hookpoint=layers.1",
                                f"train.out_dir={tmp_path / 'a'}"])
    with pytest.raises(ValueError, match="data.hookpoints=.*excludes data.target_hookpoint"):
        run_training(run)
    run = compose_train_config(["data=live", f"data.live.model.name={model}", f"data.live.text.name={docs}",
                                "data.hookpoints=[layers.0,layers.9]", f"train.out_dir={tmp_path / 'b'}"])
    with pytest.raises(ValueError, match="layers.9"):
        run_training(run)


PAIRS = {"hookpoints": ["layers.*.mlp_in"], "target_hookpoints": ["layers.*.mlp"]}


def test_transcoder_pairs_from_one_harvest_equal_single_pair_harvests(assets):
    """``data.target_hookpoints``: every layer's (MLP input, MLP output) from one pass, each pair's
    rows, order and normalisation as a single transcoder's live source gives them."""
    model, docs = assets
    both = LiveHookpoints(_live(model, docs, normalize="scale", **PAIRS))
    assert both.hookpoints == ["layers.0.mlp_in", "layers.1.mlp_in"]
    assert both.target_of == {"layers.0.mlp_in": "layers.0.mlp", "layers.1.mlp_in": "layers.1.mlp"}
    alone = {i: _live(model, docs, hookpoint=f"layers.{i}.mlp_in", target_hookpoint=f"layers.{i}.mlp",
                      normalize="scale") for i in (0, 1)}
    for step, (multi, *singles) in enumerate(zip(both, alone[0], alone[1])):
        for i, single in enumerate(singles):
            got = multi[f"layers.{i}.mlp_in"]
            torch.testing.assert_close(got.x, single.x)
            torch.testing.assert_close(got.y, single.y)
            assert not torch.allclose(got.x, got.y)
        if step == 2:
            break
    held = both.heldout_batches(1)["layers.1.mlp_in"][0]
    ref = alone[1].heldout_batches(1)[0]
    torch.testing.assert_close(held.x, ref.x)
    torch.testing.assert_close(held.y, ref.y)
    assert both.normalization_of("layers.1.mlp_in") == alone[1].normalization


def _pairs_run(model, docs, out, *extra):
    return compose_train_config(["data=live", f"data.live.model.name={model}", f"data.live.text.name={docs}",
                                 "data.live.text.context_length=32", "data.hookpoints=[layers.*.mlp_in]",
                                 "data.target_hookpoints=[layers.*.mlp]", "data.live.heldout_contexts=16",
                                 "sae=jumprelu", "sae.transcode=true", "sae.skip_connection=true",
                                 "sae.expansion_factor=2", "train=smoke", "train.batch_size=128",
                                 "train.progress=false", "train.lr_warmup_steps=0", "train.lr_decay=constant",
                                 "train.checkpoint_every=3",
                                 "train.eval_every=3", f"train.out_dir={out}", *extra])


def test_a_skip_transcoder_per_mlp_from_one_live_pass_trains_and_resumes_exactly(assets, tmp_path):
    from sae.train.artifact import load_sae

    model, docs = assets
    straight = run_training(_pairs_run(model, docs, tmp_path / "straight", "train.steps=6"))
    names = ["jumprelu@layers.0.mlp_in", "jumprelu@layers.1.mlp_in"]
    assert sorted(straight.final_dirs) == names
    for i, name in enumerate(names):
        cfg = json.loads((straight.final_dirs[name] / "cfg.json").read_text())
        assert (cfg["data"]["hookpoint"], cfg["data"]["target_hookpoint"]) == (f"layers.{i}.mlp_in", f"layers.{i}.mlp")
        assert cfg["sae"]["transcode"] and cfg["sae"]["skip_connection"] and set(cfg["normalization"]) == {"x", "y"}
        assert cfg["normalization"]["x"]["scale"] != cfg["normalization"]["y"]["scale"]
        assert straight.eval_metrics[name]["fvu"] < 1.0
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    for name in names:  # each layer's FVU, on its training batches and on the held-out contexts
        assert any(f"train/fvu/{name}" in r for r in logged) and any(f"eval/fvu/{name}" in r for r in logged)
    # Interrupted after the checkpoint at step 3, then resumed to step 6: the same weights.
    run_training(_pairs_run(model, docs, tmp_path / "resumed", "train.steps=3"))
    resumed = run_training(_pairs_run(model, docs, tmp_path / "resumed", "train.steps=6"))
    for name in names:
        a, b = load_sae(straight.final_dirs[name]).state_dict(), load_sae(resumed.final_dirs[name]).state_dict()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}.{key} differs after resume")


def test_bad_transcoder_pairs_are_named(assets, tmp_path):
    model, docs = assets
    run = _pairs_run(model, docs, tmp_path / "a", "data.target_hookpoints=[layers.1.mlp]")
    with pytest.raises(ValueError, match=r"expand to 2 hook points .* to 1 .*each input needs one target"):
        run_training(run)
    run = _pairs_run(model, docs, tmp_path / "b", "sae.transcode=false")
    with pytest.raises(ValueError, match="sae.transcode=false with data.target_hookpoints"):
        run_training(run)
    run = _pairs_run(model, docs, tmp_path / "c", "data.hookpoints=[]")
    with pytest.raises(ValueError, match="data.target_hookpoints=.*pairs with data.hookpoints"):
        run_training(run)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_transcoder_per_pair_from_a_buffer(assets, tmp_path):
    model, docs = assets
    _harvest(model, docs, tmp_path / "buf", "[layers.*.mlp_in,layers.*.mlp]")
    common = ["data=buffer", f"data.buffer.path={tmp_path / 'buf'}",
              "data.hookpoints=[layers.0.mlp_in,layers.1.mlp_in]", "sae=jumprelu", "sae.transcode=true",
              "sae.expansion_factor=2", "train=smoke", "train.steps=5", "train.batch_size=128", "train.progress=false"]
    result = run_training(compose_train_config([*common, "data.target_hookpoints=[layers.0.mlp,layers.1.mlp]",
                                                f"train.out_dir={tmp_path / 'sae'}"]))
    for i in (0, 1):
        cfg = json.loads((result.final_dirs[f"jumprelu@layers.{i}.mlp_in"] / "cfg.json").read_text())
        assert (cfg["data"]["hookpoint"], cfg["data"]["target_hookpoint"]) == (f"layers.{i}.mlp_in", f"layers.{i}.mlp")
        assert set(cfg["normalization"]) == {"x", "y"}
    with pytest.raises(ValueError, match="lists 2 hook points and data.target_hookpoints 1"):
        run_training(compose_train_config([*common, "data.target_hookpoints=[layers.0.mlp]",
                                           f"train.out_dir={tmp_path / 'bad'}"]))
