"""Training refuses what it cannot do cleanly and leaves nothing behind (the "trust nothing, round
two" probes): Hydra writes nothing into train.out_dir, a refused resume changes no byte, override
errors are one line, NaN settings and non-finite rows are refused before training, a run that fails
before its first checkpoint removes what it wrote, foreign folders and the working directory are
refused, and a pickle in a trainer state is refused naming the file."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae.buffer.tensor_source import TensorSource
from sae.runners.config import compose_train_config
from sae.runners.train import run_training
from sae.train.checkpoint import latest_checkpoint, load_trainer_state, state_file
from sae.train.trainer import Trainer

SAE_TRAIN = str(Path(sys.executable).parent / "sae-train")
SMALL = ["data=synthetic", "data.synthetic.d=16", "train=smoke", "train.batch_size=32", "train.progress=false",
         "train.checkpoint_every=2", "sae.k=4", "sae.num_latents=64"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "SAE_KERNEL_BACKEND": "eager"}
    return subprocess.run([SAE_TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_refused_resume_and_resume_false_touch_no_byte_of_the_other_run(tmp_path):
    first = cli(*SMALL, "train.steps=2", "train.out_dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "run"
    assert not (run / ".hydra").exists() and (run / "sae-train.log").is_file()
    before = snapshot(run)
    refused = cli(*SMALL, "train.steps=2", "sae.k=8", "train.out_dir=run", cwd=tmp_path)
    assert refused.returncode == 1 and refused.stderr.startswith("sae-train: error: train.out_dir=run holds a "
                                                                 "different run")
    assert snapshot(run) == before and sorted(os.listdir(tmp_path)) == ["run"]
    moved = cli(*SMALL, "train.steps=2", "sae.k=8", "train.resume=false", "train.out_dir=run", cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # the new run's log went to its own folder
    assert '"k": 8' in (run / "run.json").read_text()


@pytest.mark.parametrize("override, says", [
    ("train.steps=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("train=smok", "Could not find 'train/smok'; Available options in 'train': default, demo, demo_lm, smoke"),
    ("sae.nope=1", "Key 'nope' not in 'SAEConfig'"),
])
def test_override_errors_are_one_line(tmp_path, override, says):
    res = cli(override, "train.out_dir=run", cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 2, res.stderr
    assert lines[0].startswith("sae-train: error: ") and says in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_nan_settings_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"sae.l1_coefficient=nan must be a finite number"):
        run_training(compose_train_config([*SMALL, "sae=relu", "sae.l1_coefficient=nan",
                                           f"train.out_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_non_finite_rows_are_refused_when_the_source_is_made():
    x = torch.randn(256, 8)
    x[77, 3] = float("inf")
    with pytest.raises(ValueError, match=r"TensorSource: x\[77\] holds NaN or Inf"):
        TensorSource(x, batch_size=32)
    y = torch.randn(256, 8)
    y[200, 0] = float("nan")
    with pytest.raises(ValueError, match=r"TensorSource: y\[200\] holds NaN or Inf"):
        TensorSource(torch.randn(256, 8), y, batch_size=32)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    real = Trainer.train_step

    def fails_at_step_1(self, batch):
        if self.step == 1:
            raise RuntimeError("simulated failure")
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", fails_at_step_1)
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_training(compose_train_config([*SMALL, "train.steps=4", f"train.out_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()
    # A folder the user made stays, empty; a failure after a checkpoint keeps the run to resume.
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError):
        run_training(compose_train_config([*SMALL, "train.steps=4", f"train.out_dir={tmp_path / 'mine'}"]))
    assert list((tmp_path / "mine").iterdir()) == []
    monkeypatch.setattr(Trainer, "train_step", lambda self, b: (_ for _ in ()).throw(RuntimeError("late"))
                        if self.step == 3 else real(self, b))
    with pytest.raises(RuntimeError, match="late"):
        run_training(compose_train_config([*SMALL, "train.steps=4", f"train.out_dir={tmp_path / 'kept'}"]))
    assert latest_checkpoint(tmp_path / "kept") is not None
    monkeypatch.setattr(Trainer, "train_step", real)
    result = run_training(compose_train_config([*SMALL, "train.steps=4", f"train.out_dir={tmp_path / 'kept'}"]))
    assert result.final_dirs


def test_foreign_folders_and_the_working_directory_are_refused(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    before = snapshot(model)
    for resume in ("true", "false"):
        with pytest.raises(ValueError, match=r"holds config.json, model.safetensors and no run.json: it is not a "
                                             r"training run's folder"):
            run_training(compose_train_config([*SMALL, f"train.resume={resume}", f"train.out_dir={model}"]))
        assert snapshot(model) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"train.out_dir=. is the current directory or holds it"):
        run_training(compose_train_config([*SMALL, "train.resume=false", "train.out_dir=."]))


def test_a_pickle_in_a_trainer_state_is_refused_naming_the_file(tmp_path):
    run_training(compose_train_config([*SMALL, "train.steps=2", f"train.out_dir={tmp_path / 'run'}"]))
    ckpt = latest_checkpoint(tmp_path / "run")
    (ckpt / state_file(0)).write_bytes(pickle.dumps(os.getcwd))  # would call a function if unpickled
    with pytest.raises(ValueError, match=rf"{state_file(0)} holds objects other than tensors and plain data"):
        load_trainer_state(ckpt)


def test_a_latest_pointer_outside_the_checkpoints_is_refused(tmp_path):
    from sae.paths import UnsafePathError
    from sae.train.checkpoint import LATEST, checkpoint_root

    run_training(compose_train_config([*SMALL, "train.steps=2", f"train.out_dir={tmp_path / 'run'}"]))
    victim = tmp_path / "victim"
    (victim / "step_00000002").mkdir(parents=True)
    (checkpoint_root(tmp_path / "run") / LATEST).write_text("../../victim/step_00000002")
    with pytest.raises(UnsafePathError, match=r"is '../../victim/step_00000002', which points outside"):
        latest_checkpoint(tmp_path / "run")
