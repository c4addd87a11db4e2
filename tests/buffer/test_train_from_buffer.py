"""Harvest -> train end to end on a tiny causal LM: buffer and live sources, normalisation recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sae.runners.config import compose_harvest_config, compose_train_config
from sae.runners.harvest import harvest_to_buffer
from sae.runners.train import run_training


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_gpt2):
    docs = tmp_path_factory.mktemp("e2e") / "docs.txt"
    docs.write_text("".join(f"Line {i}: a set keeps {i % 11} unique items in no order.\n" for i in range(400)))
    return tiny_gpt2, docs


def test_harvest_then_train_on_buffer_with_normalisation(assets, tmp_path):
    model, docs = assets
    h = compose_harvest_config([f"model.name={model}", f"text.name={docs}", "text.context_length=32",
                                "harvest.progress=false", f"writer.out_dir={tmp_path / 'buf'}",
                                "writer.shard_tokens=1024", "hookpoints=[layers.1]"])
    manifest = harvest_to_buffer(h.model, h.text, h.harvest, h.writer, h.hookpoints).manifest
    assert manifest["complete"] and manifest["tokens"] > 5000
    run = compose_train_config(["data=buffer", f"data.buffer.path={tmp_path / 'buf'}", "data.normalize=scale",
                                "train=smoke", "train.steps=12", "train.batch_size=256", "train.progress=false",
                                f"train.out_dir={tmp_path / 'sae'}", "sae.k=8", "sae.expansion_factor=4"])
    result = run_training(run)
    m = result.eval_metrics["topk"]
    assert m["tokens"] == manifest["shards"][-1]["tokens"] and 0 < m["fvu"] < 1.5 and m["l0"] == pytest.approx(8)
    cfg = json.loads((result.final_dirs["topk"] / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["normalization"]["x"]["mode"] == "scale" and cfg["normalization"]["x"]["scale"] > 0
    # data.hookpoint="" picked the buffer's only hook point; cfg.json names it (steering and attribution read it)
    assert cfg["data"]["hookpoint"] == "layers.1" and cfg["data"]["target_hookpoint"] == ""
    state_source = json.loads((tmp_path / "sae" / "summary.json").read_text())
    assert state_source["steps"] == 12


def test_train_on_live_stream(assets, tmp_path):
    model, docs = assets
    run = compose_train_config(["data=live", f"data.live.model.name={model}", f"data.live.text.name={docs}",
                                "data.live.text.context_length=32", "data.hookpoint=layers.0",
                                "data.live.heldout_contexts=16",
                                "train=smoke", "train.steps=6", "train.batch_size=128", "train.progress=false",
                                f"train.out_dir={tmp_path / 'sae'}", "sae.k=4", "sae.expansion_factor=2"])
    result = run_training(run)
    assert result.eval_metrics["topk"]["tokens"] > 128 and result.eval_metrics["topk"]["fvu"] < 1.5


@pytest.mark.slow
def test_console_scripts_harvest_then_train(assets, tmp_path):
    model, docs = assets
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bindir = os.path.dirname(sys.executable)
    harvest = subprocess.run([os.path.join(bindir, "sae-harvest"), f"model.name={model}", f"text.name={docs}",
                              f"writer.out_dir={tmp_path / 'buf'}", "writer.shard_tokens=2048",
                              "harvest.progress=false", "hookpoints=[layers.1]"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert harvest.returncode == 0, harvest.stderr[-2000:]
    assert f"buffer: {tmp_path / 'buf'}" in harvest.stdout and "hook points: layers.1 (d=32)" in harvest.stdout
    train = subprocess.run([os.path.join(bindir, "sae-train"), "data=buffer", f"data.buffer.path={tmp_path / 'buf'}",
                            "train=smoke", "train.steps=5", "train.progress=false", f"train.out_dir={tmp_path / 'sae'}",
                            "sae.k=4"], env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    assert f"outputs: {tmp_path / 'sae'}" in train.stdout and "fvu=" in train.stdout
    again = subprocess.run([os.path.join(bindir, "sae-harvest"), f"model.name={model}", f"text.name={docs}",
                            f"writer.out_dir={tmp_path / 'buf'}"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already holds a complete harvest" in again.stderr
