"""A training folder holds one run: resume checks the run's identity, one writer at a time.

Each key the identity covers gets a run that changes it and must be refused before anything in the
folder changes (config.yaml untouched), naming the key and the fix; ``train.resume=false`` moves
the old run aside; a finished run is not silently "resumed" (CLI and Python API); a second live
process into the same folder fails at once, and a SIGKILLed holder does not block the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sae.buffer.manifest import MANIFEST
from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
from sae.buffer.writer import ShardWriter
from sae.harvest.harvester import Chunk
from sae.models import SAEConfig, build_sae
from sae.runners.config import compose_train_config
from sae.runners.train import run_training
from sae.train.config import TrainConfig
from sae.train.run_dir import IDENTITY, RunFolder, identity_diff
from sae.train.trainer import Trainer


def buffer(folder, dims=None):
    dims = dims or {"a": 16, "b": 16}
    w = ShardWriter(folder, {"hookpoints": {k: {"d": d} for k, d in dims.items()}, "hookpoint_order": list(dims)},
                    100, "float32")
    n = torch.arange(400)
    w.append(Chunk({k: torch.randn(400, d) for k, d in dims.items()}, n.int(), n.int(), n))
    w.finish()
    return folder


def train(out, *extra):
    return run_training(compose_train_config(
        ["data=synthetic", "data.synthetic.d=16", "train=smoke", "train.batch_size=32", "train.progress=false",
         "train.checkpoint_every=2", "sae.k=4", "sae.num_latents=64", f"train.out_dir={out}", *extra]))


@pytest.mark.parametrize("change, key", [
    ("sae.k=8", "saes.topk.sae.k: 4 -> 8"),
    ("sae.num_latents=96", "saes.topk.num_latents: 64 -> 96"),
    ("sae.architecture=batchtopk", "saes.batchtopk: new in this run; saes.topk: only in the old run"),
    ("train.batch_size=64", "batch_size: 32 -> 64"),
    ("data.synthetic.seed=3", "data.seed: 0 -> 3"),
])
def test_resume_refuses_another_run_naming_the_key(tmp_path, change, key):
    out = tmp_path / "run"
    train(out, "train.steps=2")
    config = (out / "config.yaml").read_text()
    with pytest.raises(ValueError) as e:
        train(out, "train.steps=4", change)
    msg = str(e.value)
    assert key in msg and "holds a different run" in msg and "train.resume=false" in msg, msg
    assert (out / "config.yaml").read_text() == config  # nothing in the folder was touched


def test_resume_refuses_another_hook_point_and_buffer(tmp_path):
    buf = buffer(tmp_path / "buf")
    out = tmp_path / "run"
    common = ["data=buffer", f"data.buffer.path={buf}", "train=smoke", "train.batch_size=32", "train.progress=false",
              "sae.k=4", "sae.num_latents=64", f"train.out_dir={out}", "train.final_report=false"]
    run_training(compose_train_config([*common, "data.hookpoint=a", "train.steps=2"]))
    with pytest.raises(ValueError, match=r"data\.hookpoint: \"a\" -> \"b\""):
        run_training(compose_train_config([*common, "data.hookpoint=b", "train.steps=4"]))
    other = buffer(tmp_path / "other")
    with pytest.raises(ValueError, match=r"data\.path: .*buf\" -> .*other\""):
        run_training(compose_train_config([*common, "data.hookpoint=a", "train.steps=4", f"data.buffer.path={other}"]))


def test_resume_refuses_another_world_size(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=2")
    stored = json.loads((out / IDENTITY).read_text())
    (out / IDENTITY).write_text(json.dumps({**stored, "world_size": 2, "strategy": "data"}))
    with pytest.raises(ValueError, match=r"strategy: \"data\" -> \"none\"; world_size: 2 -> 1"):
        train(out, "train.steps=4")


def test_same_run_resumes_and_extends(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=2")
    result = train(out, "train.steps=4")
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert result.final_dirs


def test_finished_run_is_not_resumed_silently(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=2")
    with pytest.raises(ValueError, match=r"holds a finished run \(step 2 of 2\); raise train.steps"):
        train(out, "train.steps=2")

    # The Python API: a second fit() into the same folder is the same error, not 0 steps and old weights.
    def api_run():
        sae = build_sae(SAEConfig(num_latents=64, k=4), 16, seed=0)
        return Trainer(TrainConfig(batch_size=32, steps=2, out_dir=str(tmp_path / "api"), progress=False,
                                   eval_every=0, final_report=False), {"topk": sae},
                       SyntheticSource(SyntheticConfig(d=16), 32))

    api_run().fit()
    with pytest.raises(ValueError, match="holds a finished run"):
        api_run().fit()


def test_run_killed_after_its_last_checkpoint_gets_its_final_weights(tmp_path):
    """kill -9 between the last checkpoint and final/: the rerun writes final/ from that checkpoint,
    bitwise equal to the uninterrupted run's, and only then is the run finished."""
    from safetensors.torch import load_file

    done, killed = tmp_path / "done", tmp_path / "killed"
    train(done, "train.steps=4")
    train(killed, "train.steps=4")
    shutil.rmtree(killed / "final")  # the state a kill -9 right after the step-4 checkpoint leaves
    result = train(killed, "train.steps=4")
    assert result.final_dirs["topk"] == killed / "final" / "topk"
    a, b = load_file(done / "final/topk/sae.safetensors"), load_file(killed / "final/topk/sae.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"holds a finished run \(step 4 of 4\)"):
        train(killed, "train.steps=4")


def test_resume_false_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=2")
    before = sorted(p.name for p in out.iterdir())
    train(out, "train.steps=2", "sae.k=8", "train.resume=false")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == before
    assert json.loads((out / IDENTITY).read_text())["saes"]["topk"]["sae"]["k"] == 8


def test_identity_diff_names_nested_keys():
    assert identity_diff({"a": {"b": 1, "c": 2}, "d": 3, "f": {"g": 1}}, {"a": {"b": 1, "c": 5}, "e": 4}) == [
        "a.c: 2 -> 5", "d: 3 -> null", "e: null -> 4", "f: only in the old run"]


HOLDER = textwrap.dedent("""
    import sys, time
    from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
    from sae.models import SAEConfig, build_sae
    from sae.train.config import TrainConfig
    from sae.train.trainer import Trainer
    sae = build_sae(SAEConfig(num_latents=64, k=4), 16, seed=0)
    t = Trainer(TrainConfig(batch_size=32, steps=10**6, out_dir=sys.argv[1], progress=False, eval_every=0,
                            final_report=False), {"topk": sae}, SyntheticSource(SyntheticConfig(d=16), 32))
    t.step_hooks.append(lambda t: time.sleep(0.05))
    t.fit()
""")


def test_one_writer_per_folder_and_a_killed_holder_does_not_block(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 60
        while not (out / IDENTITY).exists():  # written once the holder has the lock
            assert holder.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-c", HOLDER, str(out)], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert f"another training run is writing train.out_dir={out} (process {holder.pid} on" in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    folder = RunFolder(out)
    folder.lock()  # the kernel dropped the killed process's lock
    folder.release()
    assert (out / IDENTITY).exists() and not (out / MANIFEST).exists()
