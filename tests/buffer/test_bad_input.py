"""Bad input fails with clear errors and never leaves a half-written buffer marked complete."""

from __future__ import annotations

import json

import pytest
import torch

from sae.buffer.config import WriterConfig
from sae.buffer.reader import ShardReader
from sae.buffer.writer import ShardWriter
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.harvester import Chunk
from sae.harvest.tiny import save_tiny_model
from sae.models import SAEConfig, build_sae
from sae.runners import harvest as pipeline
from sae.runners.config import compose_train_config
from sae.runners.harvest import harvest_to_buffer
from sae.runners.train import run_training
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("bad") / "model", "gpt2", layers=2, hidden=32)


def docs_file(folder, rows):
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def harvest(model_dir, docs, out, hooks=("layers.1",), **harvest_kw):
    return harvest_to_buffer(ModelConfig(name=str(model_dir), device="cpu"),
                             TextConfig(name=str(docs), context_length=16),
                             HarvestConfig(batch_size=4, progress=False, **harvest_kw),
                             WriterConfig(out_dir=str(out), shard_tokens=64), list(hooks))


def test_unknown_hookpoint_leaves_nothing(model_dir, tmp_path):
    docs = docs_file(tmp_path, [{"text": "a b c"}])
    with pytest.raises(ValueError, match=r"hook point 'layers.9' not found; model has layers.0..layers.1"):
        harvest(model_dir, docs, tmp_path / "out", hooks=("layers.9",))
    assert not (tmp_path / "out").exists()


def test_empty_dataset_and_missing_column_leave_nothing(model_dir, tmp_path):
    with pytest.raises(ValueError, match="has no column 'text'; columns: \\['body'\\]"):
        harvest(model_dir, docs_file(tmp_path, [{"body": "x y"}]), tmp_path / "out")
    with pytest.raises(ValueError, match="gave no tokens to harvest"):
        harvest(model_dir, docs_file(tmp_path, [{"text": ""}, {"text": ""}]), tmp_path / "out")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="are empty"):
        harvest(model_dir, tmp_path / "empty.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_rows_stop_the_harvest_and_keep_only_complete_shards(model_dir, tmp_path, monkeypatch):
    docs = docs_file(tmp_path, [{"text": f"Row {i} of the table has a key and a value."} for i in range(200)])
    real_load, calls = pipeline.load_model, {"n": 0}

    def load_nan_model(cfg):  # the model emits NaN in one row of its 6th forward pass
        lm = real_load(cfg)

        def poison(module, args, output):
            calls["n"] += 1
            if calls["n"] == 7:  # the first call is the harvester's shape probe
                (output[0] if isinstance(output, tuple) else output)[1, 5] = float("nan")
        lm.model.h[0].register_forward_hook(poison)
        return lm

    monkeypatch.setattr(pipeline, "load_model", load_nan_model)
    out = tmp_path / "out"
    # attention spreads the NaN over its context (0 * NaN = NaN): every kept row of context 21
    with pytest.raises(ValueError, match=r"NaN/Inf at hook point 'layers.1' in 15 row\(s\) \(first: context 21, "
                                         r"position 1\)"):
        harvest(model_dir, docs, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["tokens"] == 64 * len(manifest["shards"]) > 0
    reader = ShardReader(out, 32, heldout_shards=0, epochs=1, verify="open")
    assert all(bool(torch.isfinite(b.x).all()) for b in reader)
    monkeypatch.setattr(pipeline, "load_model", real_load)
    assert harvest(model_dir, docs, out).manifest["complete"]  # the fixed model resumes the harvest


def test_float16_overflow_is_refused():
    w = ShardWriter("/nonexistent", {"hookpoints": {"a": {"d": 2}}, "hookpoint_order": ["a"]}, 8, "float16")
    big = torch.tensor([[1.0, 7e4]])
    with pytest.raises(ValueError, match="overflow torch.float16 .* use writer.dtype=bfloat16"):
        w.append(Chunk({"a": big}, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                       torch.zeros(1, dtype=torch.int64)))


def fake_buffer(folder, dims):
    w = ShardWriter(folder, {"hookpoints": {k: {"d": d} for k, d in dims.items()}, "hookpoint_order": list(dims)},
                    100, "float32")
    n = torch.arange(300)
    w.append(Chunk({k: torch.randn(300, d) for k, d in dims.items()}, n.int(), n.int(), n))
    w.finish()


def test_d_mismatch_between_buffer_and_sae_is_a_clear_error(tmp_path):
    fake_buffer(tmp_path / "wide", {"x": 24})
    fake_buffer(tmp_path / "narrow", {"x": 16, "y": 12})
    sae_64 = {"s": build_sae(SAEConfig(k=4, num_latents=64), 16)}
    with pytest.raises(ValueError, match="expects d_in=16, d_out=16 but the activations have d_in=24, d_out=24"):
        Trainer(TrainConfig(batch_size=32, steps=2, out_dir=str(tmp_path / "t")), sae_64,
                ShardReader(tmp_path / "wide", 32))

    def run(buffer, out, *extra):
        return run_training(compose_train_config(
            ["data=buffer", f"data.buffer.path={buffer}", "train=smoke", "train.steps=3", "train.batch_size=32",
             "train.progress=false", f"train.out_dir={out}", "sae.k=4", "sae.num_latents=32", *extra]))

    run(tmp_path / "narrow", tmp_path / "run", "data.hookpoint=x")
    with pytest.raises(ValueError, match=r"trained with d_in=16, d_out=16, but the activations have d_in=24, "
                                         r"d_out=24 \(buffer .*wide, hook point x\); use a fresh train.out_dir"):
        run(tmp_path / "wide", tmp_path / "run")
    with pytest.raises(ValueError, match="d_out=12 differs from d_in=16; set sae.transcode=true"):
        run(tmp_path / "narrow", tmp_path / "run2", "data.hookpoint=x", "data.target_hookpoint=y")
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("override, message", [
    ("data.buffer.verify=sometimes", "data.buffer.verify='sometimes' must be one of lazy, open, none"),
    ("data.normalize=zscore", "data.normalize='zscore' must be one of auto, none, scale, center_scale"),
    ("data.hookpoint=''", "data.hookpoint='' must name a hook point for data=live"),
])
def test_bad_data_settings_name_the_field(override, message):
    from sae.buffer.config import validate_data

    source = "data=live" if "hookpoint" in override else "data=buffer"
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate_data(compose_train_config([source, override]).data)
