"""What ``sae-export`` reads: run folders, checkpoint steps, latent-parallel shards, foreign formats; provenance."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from saes import activations, make_sae, outputs
from safetensors.torch import save_file

from sae.export import collect, export_checkpoint, export_items, load_pretrained, load_pretrained_with_info
from sae.export.item import ExportItem
from sae.models.base import Shard
from sae.runners.config import compose_train_config
from sae.runners.export import main as export_main
from sae.runners.train import run_training
from sae.train.artifact import load_sae, save_sae
from sae.train.checkpoint import shard_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny real training run with two SAEs (topk and a k=3 variant) and a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("train") / "run"
    cfg = compose_train_config(["train=smoke", "train.steps=4", "train.batch_size=64", "train.checkpoint_every=2",
                                "train.keep_checkpoints=5", "train.progress=false", "train.eval_every=0",
                                "data.synthetic.d=8", "data.synthetic.num_features=24", "sae.expansion_factor=4",
                                "sae.k=2", "+variants={k3: {k: 3}}", f"train.out_dir={out}"])
    run_training(cfg, heldout=1)
    return out


def test_run_folder_exports_every_sae_with_its_provenance(run_dir, tmp_path):
    result = export_checkpoint(run_dir, tmp_path / "out", "ours", model_name="synthetic-toy")
    assert set(result.folders) == {"topk", "k3"}  # no hook point on synthetic data: folders take the SAE name
    summary = json.loads((run_dir / "summary.json").read_text())
    for name, folder in result.folders.items():
        final = load_sae(run_dir / "final" / name)
        back = load_pretrained(folder)
        assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), back.state_dict().values()))
        card = (folder / "README.md").read_text()
        assert f"| tokens trained | {summary['tokens']:,} |" in card and f"| steps | {summary['steps']} |" in card
        assert f"| fvu | {summary['eval'][name]['fvu']:.4g} |" in card and "training summary" in card
        assert f"| sparsity | k = {final.cfg.k} latents per token |" in card
        meta = json.loads((folder / "cfg.json").read_text())
        assert meta["data"]["source"] == "synthetic" and meta["provenance"]["tokens"] == summary["tokens"]
    assert "`k3`" in (tmp_path / "out" / "README.md").read_text()


def test_checkpoint_step_folder_reports_its_own_step_and_tokens(run_dir, tmp_path):
    items = collect(run_dir / "checkpoints" / "step_00000002")
    assert sorted(i.name for i in items) == ["k3", "topk"]
    assert all(i.steps == 2 and i.tokens == 2 * 64 for i in items)


def test_eval_report_metrics_and_densities_are_used_when_present(tmp_path):
    folder = tmp_path / "run" / "final" / "topk"
    sae = make_sae("topk")
    save_sae(sae, folder, data={"source": "buffer", "hookpoint": "layers.4"})
    (folder / "eval").mkdir()
    (folder / "eval" / "report.json").write_text(json.dumps(
        {"metrics": {"fvu": 0.0625, "l0": 4.0, "dead_fraction": 0.125},
         "splice": {"metrics": {"ce_loss_increase": 0.75}}}))
    freq = torch.linspace(0, 0.5, sae.num_latents)
    save_file({"frequency": freq}, str(folder / "eval" / "latents.safetensors"))
    result = export_checkpoint(folder, tmp_path / "out", "saelens")
    card = (result.folders["topk"] / "README.md").read_text()
    assert "report.json" in card and "| fvu | 0.0625 |" in card and "| splice_ce_loss_increase | 0.75 |" in card
    from safetensors.torch import load_file

    sparsity = load_file(str(result.folders["topk"] / "sparsity.safetensors"))["sparsity"]
    torch.testing.assert_close(sparsity, torch.log10(freq + 1e-10))
    assert result.folders["topk"].name == "layers.4"


def test_latent_parallel_shards_are_joined(tmp_path):
    full = make_sae("topk")
    for r in range(2):
        part = full.latent_shard(r, 2)
        save_sae(part, tmp_path / "final" / "topk" / shard_dir(r, 2), data={"hookpoint": "layers.0"},
                 shard=dataclasses.asdict(Shard(r, 2, r * full.num_latents // 2, full.num_latents)))
    result = export_checkpoint(tmp_path / "final" / "topk", tmp_path / "out", "sparsify")
    back = load_pretrained(result.folders["topk"])
    x = activations()
    for a, b in zip(outputs(full, x), outputs(back, x)):
        assert torch.equal(a, b)


def test_a_foreign_folder_converts_to_our_format(tmp_path):
    sae = make_sae("jumprelu")
    export_items([ExportItem("j", sae, hookpoint="layers.2", model_name="m")], tmp_path / "lens", "saelens")
    result = export_checkpoint(tmp_path / "lens", tmp_path / "ours", "ours")
    (folder,) = result.folders.values()
    assert folder == tmp_path / "ours" / "layers.2"
    loaded = load_pretrained_with_info(folder)
    assert loaded.format == "ours" and loaded.hookpoint == "layers.2" and loaded.model_name == "m"
    from sae.eval.inputs import data_config

    data = data_config(loaded.cfg)  # what sae-eval reads: evaluate it on a buffer of that hook point
    assert (data.source, data.hookpoint) == ("buffer", "layers.2")
    x = activations()
    for a, b in zip(outputs(sae, x), outputs(loaded.sae, x)):
        assert torch.equal(a, b)


def test_bad_inputs_fail_with_the_fix_in_the_message(tmp_path, run_dir, capsys):
    with pytest.raises(ValueError, match="drop --hookpoint"):
        export_checkpoint(run_dir, tmp_path / "out", "ours", hookpoint="layers.1")
    with pytest.raises(ValueError, match="choose one of ours, saelens, sparsify"):
        export_checkpoint(run_dir, tmp_path / "out", "onnx")
    with pytest.raises(SystemExit) as err:
        export_main([str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert "sae-export: error:" in str(err.value) and "nothing" in str(err.value)
    assert "is not a Hub repo id" in str(err.value)  # a mistyped path is not sent to the Hub
    relu = make_sae("relu")
    save_sae(relu, tmp_path / "relu_run" / "final" / "relu")
    with pytest.raises(SystemExit) as err:
        export_main([str(tmp_path / "relu_run"), str(tmp_path / "out2"), "--format", "sparsify"])
    assert "sparsify loads TopK sparse coders only" in str(err.value) and "--format saelens" in str(err.value)
    assert not (tmp_path / "out2").exists()  # refused before writing anything
