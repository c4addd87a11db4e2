"""Interrupted harvests resume to the byte-identical buffer; complete buffers are protected."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sae.buffer import writer as writer_module
from sae.buffer.config import WriterConfig
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.tiny import save_tiny_model
from sae.runners.harvest import harvest_to_buffer

HOOKS = ["layers.1", "layers.0.mlp"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_model(root / "model", "gpt2", layers=2, hidden=32)
    docs = root / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"Doc {i}. " + "Iterators yield items lazily. " * (i % 5 + 1)})
                              for i in range(400)) + "\n")
    return model, docs


def configs(setup, out, **writer):
    model, docs = setup
    return (ModelConfig(name=str(model), device="cpu"), TextConfig(name=str(docs), context_length=24),
            HarvestConfig(batch_size=4, max_tokens=3000, progress=False),
            WriterConfig(out_dir=str(out), shard_tokens=256, **writer))


def buffer_files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != "cli.log"}


def test_crash_between_shard_rename_and_manifest_resumes_identically(setup, tmp_path, monkeypatch):
    reference = harvest_to_buffer(*configs(setup, tmp_path / "ref"), HOOKS)
    assert len(reference.manifest["shards"]) == 12  # 11 full shards of 256 + 184

    real, calls = writer_module.write_json_atomic, {"n": 0}

    def crash_on_fifth(path, obj):
        calls["n"] += 1
        if calls["n"] == 5:  # shard 4's files are renamed into place, the manifest is not updated
            raise KeyboardInterrupt("simulated kill")
        real(path, obj)

    monkeypatch.setattr(writer_module, "write_json_atomic", crash_on_fifth)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        harvest_to_buffer(*configs(setup, out), HOOKS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 4
    assert (out / "layers.1" / "shard_000004.safetensors").exists()  # an orphan the manifest does not list
    monkeypatch.setattr(writer_module, "write_json_atomic", real)
    resumed = harvest_to_buffer(*configs(setup, out), HOOKS)
    assert resumed.resumed and resumed.new_tokens == 3000 - 4 * 256
    assert buffer_files(out) == buffer_files(tmp_path / "ref")


DRIVER = textwrap.dedent("""
    import json, sys, time, torch
    torch.set_num_threads(1)
    from sae.buffer import writer
    from sae.buffer.config import WriterConfig
    from sae.runners.harvest import harvest_to_buffer
    from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
    model, docs, out, slow, depth = sys.argv[1:6]
    if slow == "1":  # widen the window between renaming a shard and listing it in the manifest
        real = writer.write_json_atomic
        writer.write_json_atomic = lambda p, o: (time.sleep(0.15), real(p, o))
    harvest_to_buffer(ModelConfig(name=model, device="cpu"), TextConfig(name=docs, context_length=24),
                      HarvestConfig(batch_size=4, max_tokens=3000, progress=False, pipeline_depth=int(depth)),
                      WriterConfig(out_dir=out, shard_tokens=256), HOOKS)
""").replace("HOOKS", repr(HOOKS))


def run_driver(setup, out, slow: bool, depth: int = 0) -> subprocess.Popen:
    model, docs = setup
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(model), str(docs), str(out), "1" if slow else "0",
                             str(depth)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill_9_mid_harvest_then_restart_equals_uninterrupted_run(setup, tmp_path):
    """The reference harvest is synchronous; the killed and the restarted ones are pipelined (writer
    thread two chunks behind the forward), so this also shows the two paths write the same bytes."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    proc = run_driver(setup, ref, slow=False, depth=0)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    proc = run_driver(setup, out, slow=True, depth=2)
    deadline = time.time() + 240
    shards = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            shards = len(json.loads((out / "manifest.json").read_text())["shards"])
        except (FileNotFoundError, json.JSONDecodeError):
            shards = 0
        if shards >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the harvest finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = json.loads((out / "manifest.json").read_text())
    assert not killed["complete"] and 3 <= len(killed["shards"]) < 12
    proc = run_driver(setup, out, slow=False, depth=2)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    final, expected = buffer_files(out), buffer_files(ref)
    assert final.keys() == expected.keys()
    assert json.loads(final["manifest.json"]) == json.loads(expected["manifest.json"])
    assert final == expected  # same tokens, same order, same bytes, same checksums


def test_complete_buffer_is_never_overwritten_by_accident(setup, tmp_path):
    first = harvest_to_buffer(*configs(setup, tmp_path), HOOKS[:1])
    before = buffer_files(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a complete harvest .* writer.overwrite=true"):
        harvest_to_buffer(*configs(setup, tmp_path), HOOKS[:1])
    assert buffer_files(tmp_path) == before
    model, text, harvest, writer = configs(setup, tmp_path, overwrite=True)
    harvest.max_tokens = 500
    again = harvest_to_buffer(model, text, harvest, writer, HOOKS[1:])
    assert again.manifest["tokens"] == 500 and first.manifest["tokens"] == 3000
    assert not (tmp_path / "layers.1").exists() and (tmp_path / "layers.0.mlp").is_dir()


def test_resume_with_other_settings_is_refused(setup, tmp_path, monkeypatch):
    real = writer_module.write_json_atomic
    monkeypatch.setattr(writer_module, "write_json_atomic",
                        lambda p, o: real(p, o) if len(o["shards"]) < 2 else (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        harvest_to_buffer(*configs(setup, tmp_path), HOOKS)
    monkeypatch.setattr(writer_module, "write_json_atomic", real)
    model, text, harvest, writer = configs(setup, tmp_path)
    text.context_length = 32
    with pytest.raises(ValueError, match=r"unfinished harvest with different settings \(text.context_length\)"):
        harvest_to_buffer(model, text, harvest, writer, HOOKS)


def test_a_second_harvest_cannot_write_the_same_folder(setup, tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another harvest is writing"):
            harvest_to_buffer(*configs(setup, tmp_path), HOOKS)
    finally:
        os.close(fd)


def test_pipelined_harvest_writes_the_same_bytes_as_the_synchronous_one(setup, tmp_path):
    model, text, harvest, writer = configs(setup, tmp_path / "sync")
    harvest.pipeline_depth = 0
    harvest_to_buffer(model, text, harvest, writer, HOOKS)
    model, text, harvest, writer = configs(setup, tmp_path / "pipelined")
    harvest.pipeline_depth = 2  # what auto picks on a GPU (on this CPU it picks 0)
    harvest_to_buffer(model, text, harvest, writer, HOOKS)
    assert buffer_files(tmp_path / "pipelined") == buffer_files(tmp_path / "sync")


@pytest.mark.parametrize("depth", [0, 2], ids=["synchronous", "pipelined"])
def test_a_failing_write_stops_the_harvest_naming_the_shard(setup, tmp_path, monkeypatch, depth):
    """A full disk at shard 3: the error names the file, the manifest lists shards 0-2 only and no
    later shard is written (no gap); fixing the disk and rerunning completes the same buffer."""
    import errno

    from sae.buffer.atomic import naming_the_file

    real = writer_module.write_bytes_atomic

    def full_at_shard_3(path, data):
        if path.name == "shard_000003.safetensors":
            with naming_the_file(path):
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(writer_module, "write_bytes_atomic", full_at_shard_3)
    out = tmp_path / "run"
    model, text, harvest, writer = configs(setup, out)
    harvest.pipeline_depth = depth
    with pytest.raises(OSError, match=f"no space left on the device while writing {out / HOOKS[0]}/shard_000003"):
        harvest_to_buffer(model, text, harvest, writer, HOOKS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2] and not manifest["complete"]
    assert not list(out.rglob("shard_00000[4-9]*")), "nothing is written after the failed shard"
    monkeypatch.setattr(writer_module, "write_bytes_atomic", real)
    harvest_to_buffer(*configs(setup, out), HOOKS)
    harvest_to_buffer(*configs(setup, tmp_path / "ref"), HOOKS)
    assert buffer_files(out) == buffer_files(tmp_path / "ref")
