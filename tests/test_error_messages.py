"""Each user error names the problem and the fix in one line; the CLIs print it without a traceback.

One test per message: a model folder that does not exist, contexts longer than the model's
positions, a damaged manifest.json, a negative step count, sae-eval on a SAELens folder, a full
disk, NaN rows in a shard, a trainer state that cannot be saved, a harvest resumed with a smaller
budget than it already wrote, an export into its own source. Then the command-line form: the error
is one ``sae-...: error:`` line plus a hint, no traceback, unless ``SAE_DEBUG=1``.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from sae.buffer.atomic import write_bytes_atomic
from sae.buffer.manifest import MANIFEST, read_manifest
from sae.buffer.reader import ShardReader
from sae.buffer.writer import ShardWriter
from sae.harvest.config import ModelConfig, TextConfig
from sae.harvest.harvester import Chunk, check_context_length
from sae.harvest.model import load_model, resolve_model_path
from sae.models import SAEConfig, build_sae
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer, validate_train_config


def one_line(msg: str) -> str:
    assert "\n" not in msg, msg
    return msg


def buffer(folder, rows=300, nan_row=None):
    w = ShardWriter(folder, {"hookpoints": {"x": {"d": 8}}, "hookpoint_order": ["x"]}, 100, "float32")
    acts = torch.randn(rows, 8)
    if nan_row is not None:
        acts[nan_row, 3] = float("nan")
    n = torch.arange(rows)
    w.append(Chunk({"x": acts}, n.int(), n.int(), n))
    w.finish()
    return folder


def test_missing_model_folder():
    with pytest.raises(ValueError) as e:
        resolve_model_path("./models/not-there")
    assert "model.name='./models/not-there': no such folder, and not a Hugging Face repo id" in one_line(
        str(e.value))
    assert resolve_model_path("org/name") == "org/name"  # a repo id is left to the Hub


def test_context_longer_than_the_model(tiny_gpt2):
    lm = load_model(ModelConfig(name=str(tiny_gpt2), device="cpu"))
    with pytest.raises(ValueError, match=r"text.context_length=4096 exceeds the 512 positions of model .*; use "
                                         r"text.context_length<=512"):
        check_context_length(lm, TextConfig(context_length=4096).context_length)


def test_damaged_manifest(tmp_path):
    buffer(tmp_path / "buf")
    (tmp_path / "buf" / MANIFEST).write_text('{"format": "sae-forge-buffer", ')
    with pytest.raises(ValueError) as e:
        read_manifest(tmp_path / "buf")
    assert f"{tmp_path / 'buf' / MANIFEST} is not valid JSON" in one_line(str(e.value))
    assert "harvest the buffer again" in str(e.value)


def test_negative_steps():
    with pytest.raises(ValueError, match=r"train.steps=-5 must be >= 0 \(0: train.max_tokens // train.batch_size"):
        validate_train_config(TrainConfig(steps=-5))


def test_eval_on_a_saelens_folder(tmp_path):
    from sae.eval.config import EvalConfig
    from sae.export import ExportItem, export_items
    from sae.runners.evaluate import run_eval

    sae = build_sae(SAEConfig(num_latents=32, k=4), 8, seed=0)
    export_items([ExportItem("topk", sae, {}, "layers.1")], tmp_path / "hf", "saelens")
    with pytest.raises(ValueError) as e:
        run_eval(EvalConfig(sae_path=str(tmp_path / "hf" / "layers.1"), device="cpu"))
    assert "is not in this project's SAE format" in one_line(str(e.value))
    assert "--format ours" in str(e.value)


def test_full_disk_names_the_file(tmp_path, monkeypatch):
    target = tmp_path / "shard.safetensors"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        write_bytes_atomic(target, b"data")
    assert e.value.errno == errno.ENOSPC
    assert f"no space left on the device while writing {target}" in one_line(str(e.value))
    assert not list(tmp_path.iterdir()), "no temporary file is left behind"
    monkeypatch.undo()

    import sae.train.artifact as artifact

    def safetensors_full(*a, **k):  # how safetensors reports it: its own error type, the OS error in the text
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                           "left on device\" })")

    monkeypatch.setattr(artifact, "save_file", safetensors_full)
    weights = tmp_path / "sae" / "sae.safetensors"
    with pytest.raises(OSError, match=f"no space left on the device while writing {weights}"):
        artifact.save_sae(build_sae(SAEConfig(num_latents=32, k=4), 8), tmp_path / "sae")


def test_nan_rows_name_the_shard_and_hook_point(tmp_path):
    buffer(tmp_path / "buf", nan_row=170)
    with pytest.raises(ValueError) as e:
        ShardReader(tmp_path / "buf", 16, verify="open")
    msg = one_line(str(e.value))
    assert "shard_000001.safetensors (hook point x) holds NaN/Inf in 1 row(s) (first: row 70)" in msg


def test_unpicklable_trainer_state_names_the_file(tmp_path):
    from sae.buffer.synthetic import SyntheticConfig, SyntheticSource

    class Odd(SyntheticSource):
        def state_dict(self):
            return {"it": (i for i in range(3))}  # a generator cannot be saved

    cfg = TrainConfig(batch_size=32, steps=1, out_dir=str(tmp_path / "run"), progress=False, eval_every=0)
    trainer = Trainer(cfg, {"topk": build_sae(SAEConfig(num_latents=32, k=4), 16)}, Odd(SyntheticConfig(d=16), 32))
    with pytest.raises(TypeError) as e:
        trainer.fit()
    msg = one_line(str(e.value))
    assert f"could not write the trainer state to {tmp_path / 'run' / 'checkpoints' / 'step_00000001'}" in msg
    assert "must hold only tensors, numbers, strings, lists and dicts" in msg


def test_harvest_resumed_below_what_it_wrote(tmp_path):
    from sae.buffer.config import WriterConfig
    from sae.harvest.config import HarvestConfig
    from sae.runners.harvest import harvest_to_buffer

    folder = buffer(tmp_path / "buf")
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))  # as if killed
    with pytest.raises(ValueError) as e:
        harvest_to_buffer(ModelConfig(), TextConfig(), HarvestConfig(max_tokens=200), WriterConfig(out_dir=str(folder)),
                          ["layers.0"])
    assert "holds an unfinished harvest of 300 tokens, more than harvest.max_tokens=200; rerun with " \
           "harvest.max_tokens>=300" in one_line(str(e.value))


@pytest.mark.parametrize("out", ["src", "src/export", "."], ids=["is", "inside", "contains"])
def test_export_into_its_own_source(tmp_path, out):
    from sae.export import export_checkpoint
    from sae.train.artifact import save_sae

    src = tmp_path / "src"
    save_sae(build_sae(SAEConfig(num_latents=32, k=4), 8), src)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(ValueError, match="export to a folder outside it"):
        export_checkpoint(src, tmp_path / out, "sparsify", hookpoint="x")
    assert sorted(p.name for p in src.iterdir()) == before


@pytest.mark.parametrize("debug", [False, True])
def test_cli_prints_one_line_without_traceback(tmp_path, debug):
    env = {**os.environ, "SAE_DEBUG": "1" if debug else "0"}
    proc = subprocess.run([sys.executable, "-c", "from sae.runners.cli import train_main; train_main()",
                           "data=synthetic", "train.steps=-5", f"train.out_dir={tmp_path / 'run'}",
                           f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    if debug:
        assert "Traceback" in proc.stderr
    else:
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "sae-train: error: train.steps=-5 must be >= 0 (0: train.max_tokens // train.batch_size steps)",
            "(ValueError; set SAE_DEBUG=1 for the traceback)"]
