"""Sweeps: W&B sweep files expand to Hydra overrides the config accepts; Hydra multirun; one agent per GPU."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps import utils as sweep_utils

from sae.runners.config import CONF_MODULE, compose_train_config, register_configs

ROOT = Path(__file__).resolve().parents[2]
SWEEP_FILES = sorted((ROOT / "launch" / "sweeps").glob("*.yaml"))
SAE_TRAIN = str(Path(sys.executable).parent / "sae-train")


def sample(spec: dict, rng: random.Random):
    """One value of a W&B sweep parameter (the distributions these files use; others fail loudly)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    dist = spec.get("distribution", "int_uniform" if isinstance(spec["min"], int) else "uniform")
    lo, hi = spec["min"], spec["max"]
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "int_uniform":
        return rng.randint(lo, hi)
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    raise AssertionError(f"sampler does not know distribution {dist!r}; extend it")


def trials(sweep: dict, n_random: int = 4) -> list[dict]:
    """Every grid point, or ``n_random`` samples of a random/Bayesian space."""
    params = sweep["parameters"]
    if sweep["method"] == "grid":
        names = list(params)
        return [dict(zip(names, combo)) for combo in itertools.product(*(params[n]["values"] for n in names))]
    rng = random.Random(0)
    return [{n: sample(s, rng) for n, s in params.items()} for _ in range(n_random)]


def agent_command(sweep: dict, args: dict) -> list[str]:
    """The command ``wandb agent`` runs for one trial, by wandb's own macro expansion (Agent._command_run)."""
    command = sweep_utils.create_sweep_command(list(sweep["command"]))
    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in args.items()}})
    sweep_vars.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    out: list[str] = []
    for c in map(str, command):
        out += (sweep_vars.get(c[2:-1]) or []) if c.startswith("${") and c.endswith("}") else [c]
    return out


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_wandb_sweep_trials_expand_to_overrides_the_config_accepts(path, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["program"] == "sae-train"
    assert "${args_no_hyphens}" in sweep["command"]
    assert {"sae.k", "sae.expansion_factor", "train.lr"} <= set(sweep["parameters"])
    if sweep["method"] != "grid":
        assert sweep["metric"]["goal"] in ("minimize", "maximize")
    expanded = trials(sweep)
    assert len(expanded) == (12 if sweep["method"] == "grid" else 4)
    out_dirs = set()
    for i, args in enumerate(expanded):
        cmd = agent_command(sweep, args)
        assert cmd[:2] == ["/usr/bin/env", "sae-train"]
        monkeypatch.setenv("WANDB_SWEEP_ID", "sw123")
        monkeypatch.setenv("WANDB_RUN_ID", f"run{i}")
        cfg = compose_train_config(cmd[2:])
        for key, value in args.items():
            group, field = key.split(".")
            assert getattr(getattr(cfg, group), field) == pytest.approx(value), key
        assert cfg.wandb.enabled and cfg.train.out_dir == f"runs/sweeps/sw123/run{i}"
        out_dirs.add(cfg.train.out_dir)
    assert len(out_dirs) == len(expanded)  # trials never share (and so never resume) an out_dir


def test_hydra_sweep_config_is_the_wandb_grid():
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module=CONF_MODULE, version_base=None):
        cfg = compose(config_name="train", overrides=["+sweep=grid"], return_hydra_config=True)
    hydra_params = {k: [float(v) if "." in v else int(v) for v in str(s).split(",")]
                    for k, s in cfg.hydra.sweeper.params.items()}
    wandb_grid = yaml.safe_load((ROOT / "launch" / "sweeps" / "grid.yaml").read_text())["parameters"]
    assert hydra_params == {k: s["values"] for k, s in wandb_grid.items()}
    assert compose_train_config(["+sweep=grid"]).sae.k == 32  # the sweep group leaves the base config valid


@pytest.mark.slow
def test_hydra_multirun_of_three_trials_completes_on_cpu(tmp_path):
    sweep_dir = tmp_path / "multirun"
    done = subprocess.run(
        [SAE_TRAIN, "-m", "sae.k=2,3,4", "train=smoke", "data=synthetic", "train.steps=3", "train.batch_size=64",
         "train.progress=false", "train.eval_every=0", "data.synthetic.d=8", "data.synthetic.num_features=24",
         "sae.expansion_factor=4", f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    for job, k in enumerate((2, 3, 4)):  # each job in its own folder, trained from scratch with its own k
        summary = json.loads((sweep_dir / str(job) / "summary.json").read_text())
        assert summary["steps"] == 3 and summary["tokens"] == 3 * 64
        cfg = json.loads((sweep_dir / str(job) / "final" / "topk" / "cfg.json").read_text())
        assert cfg["sae"]["k"] == k
        assert summary["eval"]["topk"]["l0"] == pytest.approx(k)
    assert not (tmp_path / "runs").exists()  # nothing went to the shared default out_dir


def test_sweep_agents_start_one_agent_per_gpu(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n'\n")
    (bin_dir / "wandb").write_text(f'#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES $*" >> {tmp_path}/calls.txt\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG_DIR": str(tmp_path / "logs")}
    done = subprocess.run(["bash", str(ROOT / "launch" / "sweep_agents.sh"), "me/proj/abc123", "--count", "2"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = sorted((tmp_path / "calls.txt").read_text().splitlines())
    assert calls == [f"{gpu} agent me/proj/abc123 --count 2" for gpu in (0, 1, 2)]
    env["GPUS"] = "5"
    (tmp_path / "calls.txt").unlink()
    subprocess.run(["bash", str(ROOT / "launch" / "sweep_agents.sh"), "me/proj/abc123"], env=env, check=True,
                   capture_output=True, timeout=60)
    assert (tmp_path / "calls.txt").read_text().split() == ["5", "agent", "me/proj/abc123"]
    usage = subprocess.run(["bash", str(ROOT / "launch" / "sweep_agents.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "wandb sweep launch/sweeps/grid.yaml" in usage.stderr
