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


def test_one_sae_per_hookpoint_from_a_buffer(assets, tmp_path):
    model, docs = assets
    h = compose_harvest_config([f"model.name={model}", f"text.name={docs}", "text.context_length=32",
                                "harvest.progress=false", f"writer.out_dir={tmp_path / 'buf'}",
                                "writer.shard_tokens=1024", "hookpoints=[layers.0,layers.1]"])
    harvest_to_buffer(h.model, h.text, h.harvest, h.writer, h.hookpoints)
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
