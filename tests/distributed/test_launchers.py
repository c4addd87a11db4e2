"""The README's launch commands run a real 2-process job on CPU (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["train=smoke", "train.steps=6", "data.synthetic.d=32", "sae.expansion_factor=4", "sae.k=8",
         "train.progress=false"]


def _env():
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_torchrun_single_node_script(tmp_path):
    out = tmp_path / "tr"
    env = {**_env(), "NPROC": "2", "OUT": str(out), "PARALLEL": "data"}
    proc = subprocess.run(["bash", str(ROOT / "launch/torchrun_single_node.sh"), *SMALL], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _summary(out)
    assert s["world_size"] == 2 and s["parallel"] == "data" and s["tokens"] == 6 * 512 * 2
    assert proc.stdout.count("outputs:") == 1  # only rank 0 prints the summary


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="accelerate CLI not installed in this environment")
def test_accelerate_launch_with_the_repo_config(tmp_path):
    out = tmp_path / "acc"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    sae_train = str(Path(sys.executable).parent / "sae-train")
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch/accelerate_config.yaml"), "--num_processes", "2",
           sae_train, *SMALL, "train.parallel=latent", f"train.out_dir={out}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _summary(out)
    assert s["world_size"] == 2 and s["parallel"] == "latent"
    assert sorted(p.name for p in (out / "final" / "topk").iterdir()) == ["shard_00_of_02", "shard_01_of_02"]
    assert s["eval"]["topk"]["l0"] <= 8


def test_torchrun_hookpoint_parallel_on_a_live_harvest(tmp_path, tiny_gpt2):
    model = tiny_gpt2
    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"Line {i}: a dict maps {i % 9} keys.\n" for i in range(300)))
    out = tmp_path / "hp"
    env = {**_env(), "NPROC": "2", "OUT": str(out), "PARALLEL": "sae"}
    args = ["data=live", f"data.live.model.name={model}", f"data.live.text.name={docs}",
            "data.live.text.context_length=32", "data.live.heldout_contexts=16", "data.hookpoints=[layers.0,layers.1]",
            "train=smoke", "train.steps=5", "train.batch_size=128", "train.progress=false", "sae.k=4",
            "sae.expansion_factor=2", "train.final_report=false", "train.eval_every=2"]
    proc = subprocess.run(["bash", str(ROOT / "launch/torchrun_single_node.sh"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _summary(out)
    assert s["world_size"] == 2 and s["parallel"] == "sae" and s["steps"] == 5
    assert set(s["final"]) == {"topk@layers.0", "topk@layers.1"}
    for name, folder in s["final"].items():
        cfg = json.loads((Path(folder) / "cfg.json").read_text())
        assert cfg["data"]["hookpoint"] == name.split("@")[1] and cfg["d_in"] == 32
        assert s["eval"][name]["l0"] <= 4 + 1e-6 and s["eval"][name]["tokens"] > 0
    # Periodic held-out evaluation: each rank scores its own SAE, rank 0 logs both.
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    assert all({"eval/fvu/topk@layers.0", "eval/fvu/topk@layers.1"} <= set(r) for r in evals)
