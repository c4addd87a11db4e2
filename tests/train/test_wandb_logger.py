"""W&B tracking: what an offline run records, config validation, and rank 0 alone logging in a 2-process run."""

from __future__ import annotations

import json
import socket

import pytest
import torch.multiprocessing as mp
import wandb
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError
from wandb_records import read_offline_run
from wandb_workers import run_data_parallel

from sae.runners.config import compose_train_config
from sae.runners.train import run_training
from sae.train.wandb_logger import WandbConfig, validate_wandb

TINY = ["train=smoke", "train.steps=4", "train.batch_size=64", "train.log_every=1", "train.progress=false",
        "train.eval_every=2", "train.eval_batches=1", "data.synthetic.d=8", "data.synthetic.num_features=24",
        "sae.expansion_factor=4", "sae.k=2"]
TRAIN_KEYS = ["train/loss/topk", "train/fvu/topk", "train/l0/topk", "train/lr/topk", "train/dead_fraction/topk",
              "train/tokens"]


def offline_runs(wandb_dir):
    return sorted((wandb_dir / "wandb").glob("offline-run-*"))


def test_offline_run_records_config_metrics_histograms_summary_and_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    cfg = compose_train_config(TINY + [f"train.out_dir={out}", "wandb.enabled=true", "wandb.project=sae-tests",
                                       "wandb.name=tiny-topk", "wandb.group=k-sweep", "wandb.tags=[tiny,cpu]",
                                       "wandb.log_artifact=true"])
    result = run_training(cfg, heldout=1)
    wandb.teardown()  # the W&B service writes the .wandb file asynchronously; this waits until it is complete
    (run_dir,) = offline_runs(out)  # default dir: train.out_dir
    run = read_offline_run(run_dir)
    assert (run.run.display_name, run.run.run_group, list(run.run.tags)) == ("tiny-topk", "k-sweep", ["tiny", "cpu"])
    assert run.run.project == "sae-tests"
    assert run.config["sae"]["k"] == 2 and run.config["sae"]["architecture"] == "topk"
    assert run.config["train"]["steps"] == 4 and run.config["data"]["synthetic"]["d"] == 8
    assert run.config["wandb"]["log_artifact"] is True
    keys = run.history_keys()
    assert set(TRAIN_KEYS) <= keys
    assert {"eval/fvu/topk", "eval/l0/topk", "eval/dead_fraction/topk"} <= keys  # periodic held-out evaluation
    assert "eval/feature_density/topk/_type" in keys and "final/feature_density/topk/_type" in keys
    by_step = {}
    for row in run.history:
        by_step.setdefault(row["_step"], {}).update(row)
    assert sorted(by_step) == [1, 2, 3, 4]
    assert [by_step[s]["train/tokens"] for s in (1, 2, 3, 4)] == [64, 128, 192, 256]
    assert "eval/fvu/topk" in by_step[2] and "eval/fvu/topk" in by_step[4] and "eval/fvu/topk" not in by_step[3]
    hist = by_step[4]["final/feature_density/topk/values"]
    assert 0 < sum(hist) <= 32  # live latents of 32, binned by log10 frequency
    assert run.summary["final/fvu/topk"] == pytest.approx(result.eval_metrics["topk"]["fvu"])
    assert run.summary["train/fvu/topk"] == pytest.approx(result.train_metrics["train/fvu/topk"])
    (art,) = run.artifacts
    assert art.type == "model" and art.name.startswith("sae-")
    assert {"topk/sae.safetensors", "topk/cfg.json"} <= {m.path for m in art.manifest.contents}


def test_disabled_by_default_writes_no_wandb_folder(tmp_path):
    out = tmp_path / "run"
    run_training(compose_train_config(TINY + [f"train.out_dir={out}"]), heldout=1)
    assert not (out / "wandb").exists() and (out / "summary.json").is_file()


def test_wandb_config_is_validated():
    cfg = compose_train_config(["wandb.enabled=true", "wandb.mode=offline", "wandb.tags=[a,b]"])
    assert cfg.wandb == WandbConfig(enabled=True, mode="offline", tags=["a", "b"])
    with pytest.raises(ValueError, match="wandb.mode='sometimes' must be"):
        validate_wandb(WandbConfig(mode="sometimes"))
    with pytest.raises(ValueError, match="wandb.project=''"):
        validate_wandb(WandbConfig(enabled=True, project=""))
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_train_config(["wandb.projet=x"])
    assert "projet" in str(err.value) + str(err.value.__cause__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_only_rank0_logs_in_a_two_process_run(tmp_path):
    out = tmp_path / "run"
    overrides = TINY + ["train.parallel=data", f"train.out_dir={out}", "wandb.enabled=true",
                        f"wandb.dir={tmp_path / 'wb'}", "wandb.name=ddp"]
    mp.spawn(run_data_parallel, args=(2, free_port(), str(tmp_path), overrides), nprocs=2, join=True)
    built = [json.loads((tmp_path / f"rank{r}.json").read_text())["wandb_loggers"] for r in range(2)]
    assert built == [1, 0]
    (run_dir,) = offline_runs(tmp_path / "wb")
    run = read_offline_run(run_dir)
    assert run.run.display_name == "ddp" and run.config["train"]["parallel"] == "data"
    tokens = sorted({row["train/tokens"] for row in run.history if "train/tokens" in row})
    assert tokens == [128, 256, 384, 512]  # both ranks' batches counted once, by the one logging rank
    assert set(TRAIN_KEYS) <= run.history_keys()


@pytest.mark.distributed
def test_sae_parallel_run_logs_every_ranks_saes(tmp_path):
    """train.parallel=sae: each rank holds one SAE; rank 0's W&B run gets both SAEs' periodic
    evaluation and feature-density histograms (gathered), not only its own."""
    out = tmp_path / "run"
    overrides = TINY + ["train.parallel=sae", "+variants={k1: {k: 1}}", f"train.out_dir={out}", "wandb.enabled=true",
                        f"wandb.dir={tmp_path / 'wb'}", "wandb.name=sweep"]
    mp.spawn(run_data_parallel, args=(2, free_port(), str(tmp_path), overrides), nprocs=2, join=True)
    (run_dir,) = offline_runs(tmp_path / "wb")
    keys = read_offline_run(run_dir).history_keys()
    for name in ("topk", "k1"):  # sorted names dealt round-robin: k1 on rank 0, topk on rank 1
        assert {f"eval/fvu/{name}", f"eval/feature_density/{name}/_type", f"final/feature_density/{name}/_type",
                f"train/fvu/{name}"} <= keys, (name, sorted(k for k in keys if name in k))
