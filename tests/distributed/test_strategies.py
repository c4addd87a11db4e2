"""Data, latent and SAE ("hook-point") parallelism with 2 gloo processes on CPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import workers as W
from safetensors.torch import load_file

from sae.buffer.synthetic import SyntheticSource
from sae.train.config import TrainConfig
from sae.train.reshard import reshard_checkpoint
from sae.train.shards import consolidate_sae
from sae.train.trainer import Trainer

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args):
    mp.spawn(fn, args=(2, free_port(), *args), nprocs=2, join=True)


def single(saes, source, out_dir, steps, batch, objective=None, **kw):
    t = Trainer(W.train_cfg(out_dir, steps, batch, **kw), saes, source, objective=objective)
    t.fit()
    return t


def assert_close_state(a: dict, b: dict, atol=2e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=f"{k} differs")


@pytest.mark.parametrize("extra", [{}, {"grad_accum_steps": 2}], ids=["plain", "grad_accum"])
def test_data_parallel_equals_single_process_on_the_union(tmp_path, extra):
    steps, batch = 12, 64
    spawn(W.run_strategy, str(tmp_path), "data", "topk", steps, batch, extra)
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert_close_state(r0, r1, atol=0, rtol=0)  # replicas stay identical
    ref = single({"a": W.make_sae("topk", 0)}, W.UnionSource(2, batch), tmp_path / "ref", steps, 2 * batch, **extra)
    assert_close_state(r0, {f"a.{k}": v for k, v in ref.saes["a"].state_dict().items()})


def test_a_target_l0_controller_under_data_parallel_equals_single_process(tmp_path):
    """The L0 the controller reads is all-reduced: both ranks and one process on the union of their
    batches steer the penalty's coefficient alike, and so train the same weights."""
    steps, batch = 25, 64  # controller updates after steps 10 and 20
    spawn(W.run_strategy, str(tmp_path), "data", "relu@5", steps, batch, {})
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    assert_close_state(r0, load_file(str(tmp_path / "rank1.safetensors")), atol=0, rtol=0)
    c0, c1 = (json.loads((tmp_path / f"rank{r}.sparsity.json").read_text())["a"] for r in (0, 1))
    ref = single({"a": W.make_sae("relu", 0, target_l0=5.0)}, W.UnionSource(2, batch), tmp_path / "ref", steps,
                 2 * batch)
    assert c0 == c1 and c0["log_multiplier"] != 0
    assert c0["log_multiplier"] == pytest.approx(ref.sparsity["a"].log_multiplier, rel=1e-3)
    assert_close_state(r0, {f"a.{k}": v for k, v in ref.saes["a"].state_dict().items()})


def test_latent_parallel_forward_backward_equals_unsharded(tmp_path):
    spawn(W.latent_forward_check, str(tmp_path))
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def test_latent_parallel_training_matches_and_reshards_to_one_rank(tmp_path):
    steps, batch = 10, 64
    spawn(W.run_strategy, str(tmp_path), "latent", "topk", steps, batch, {"checkpoint_every": 5})
    full = consolidate_sae(tmp_path / "run" / "final" / "a")
    ref = single({"a": W.make_sae("topk", 0)}, SyntheticSource(W.SYN, batch), tmp_path / "ref", steps, batch)
    assert_close_state(full.state_dict(), ref.saes["a"].state_dict())

    # Reshard the 2-rank checkpoint at step 5 to one rank and resume to step 15.
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000005"
    if not ckpt.exists():  # keep=2 kept steps 5 and 10
        pytest.fail(f"missing {ckpt}: {sorted(p.name for p in ckpt.parent.iterdir())}")
    reshard_checkpoint(ckpt, tmp_path / "resumed", world_size=1)
    resumed = single({"a": W.make_sae("topk", 0)}, SyntheticSource(W.SYN, batch), tmp_path / "resumed", 15, batch)
    ref15 = single({"a": W.make_sae("topk", 0)}, SyntheticSource(W.SYN, batch), tmp_path / "ref15", 15, batch)
    assert resumed.step == 15
    assert_close_state(resumed.saes["a"].state_dict(), ref15.saes["a"].state_dict())


def test_sae_parallel_trains_each_sae_as_one_process_would(tmp_path):
    steps, batch = 10, 64
    spawn(W.run_strategy, str(tmp_path), "sae", "topk", steps, batch, {})
    got = {**load_file(str(tmp_path / "rank0.safetensors")), **load_file(str(tmp_path / "rank1.safetensors"))}
    assert {k.split(".")[0] for k in load_file(str(tmp_path / "rank0.safetensors"))} == {"a"}
    assert {k.split(".")[0] for k in load_file(str(tmp_path / "rank1.safetensors"))} == {"b"}
    for i, name in enumerate("ab"):
        sae = W.make_sae("topk", i) if name == "a" else W.make_sae("topk", 1, k_aux=8)
        ref = single({name: sae}, SyntheticSource(W.SYN, batch), tmp_path / f"ref_{name}", steps, batch)
        want = {f"{name}.{k}": v for k, v in ref.saes[name].state_dict().items()}
        assert_close_state({k: v for k, v in got.items() if k.startswith(name + ".")}, want, atol=0, rtol=0)


def _torchrun(out: Path, steps: int, kill_at: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d",
           str(Path(W.__file__)), str(out), str(steps), str(kill_at)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    # Own process group, so a hung run is killed with all its workers (no orphans left behind).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        # torchrun starts each worker in a session of its own: find them by their output folder.
        subprocess.run(["pkill", "-9", "-f", str(out)], check=False)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 240 s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigkilled_rank_restarts_and_resumes_to_the_same_weights(tmp_path):
    steps = 16
    clean = _torchrun(tmp_path / "clean", steps, kill_at=0)
    assert clean.returncode == 0, clean.stderr[-3000:]
    killed = _torchrun(tmp_path / "killed", steps, kill_at=8)  # checkpoint at 5; steps 6-8 redone
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert (tmp_path / "killed" / "attempts").read_text() == "1"  # it really restarted, once
    a = load_file(str(tmp_path / "clean" / "final.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final.safetensors"))
    assert_close_state(a, b, atol=0, rtol=0)


def test_strategy_name_is_validated():
    from sae.train.strategy import build_strategy

    with pytest.raises(ValueError, match="train.parallel='tensor'"):
        build_strategy("tensor")


def test_resume_refuses_another_world_size(tmp_path):
    steps, batch = 4, 32
    spawn(W.run_strategy, str(tmp_path), "latent", "topk", steps, batch, {})
    t = Trainer(TrainConfig(batch_size=batch, steps=8, progress=False, out_dir=str(tmp_path / "run")),
                {"a": W.make_sae()}, SyntheticSource(W.SYN, batch))
    with pytest.raises(ValueError, match="written by 2 process"):
        t.maybe_resume()


@pytest.mark.parametrize("strategy", ["data", "latent"])
def test_bf16_autocast_under_strategies_tracks_single_process(tmp_path, strategy):
    steps, batch = 20, 64
    extra = {"mixed_precision": "bf16"}
    spawn(W.run_strategy, str(tmp_path), strategy, "topk", steps, batch, extra)
    if strategy == "data":
        got = {k[2:]: v for k, v in load_file(str(tmp_path / "rank0.safetensors")).items()}
        src, ref_batch = W.UnionSource(2, batch), 2 * batch
    else:
        got = consolidate_sae(tmp_path / "run" / "final" / "a").state_dict()
        src, ref_batch = SyntheticSource(W.SYN, batch), batch
    ref = single({"a": W.make_sae("topk", 0)}, src, tmp_path / "ref", steps, ref_batch, **extra)
    # bf16 pre-activations: rounding differs with summation order, so compare loosely, and check
    # the run moved far from its start (the comparison is not vacuous).
    want = ref.saes["a"].state_dict()
    start = W.make_sae("topk", 0).state_dict()
    moved = (want["W_enc"] - start["W_enc"]).abs().max().item()
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"{strategy} bf16: max param change {moved:.4f}, max difference to single process {diff:.5f}")
    assert moved > 0.04
    if strategy == "data":  # the same ops on the same rows: equal up to all-reduce rounding
        assert diff < 1e-5
    else:
        # Shard-wise partial sums round differently in fp32; bf16 pre-activations turn such
        # 1e-7 differences into occasional top-k flips, so the runs drift apart slowly. They must
        # still train the same way: held-out FVU within 5%.
        from sae.eval.quick import evaluate_batches

        heldout = [SyntheticSource(W.SYN, 256).batch(10**6)]
        lp = W.make_sae("topk", 0)
        lp.load_state_dict(got)
        fvu_lp, fvu_ref = evaluate_batches(lp, heldout)["fvu"], evaluate_batches(ref.saes["a"], heldout)["fvu"]
        print(f"held-out fvu: latent-parallel {fvu_lp:.4f}, single process {fvu_ref:.4f}")
        assert abs(fvu_lp - fvu_ref) < 0.05 * fvu_ref
        assert diff < 0.5 * moved


@pytest.mark.parametrize("pairs", [False, True], ids=["saes", "transcoders"])
def test_hookpoint_parallel_live_harvest_scatters_each_ranks_hookpoints(tmp_path, tiny_gpt2, pairs):
    model = tiny_gpt2
    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"Line {i}: a tuple holds {i % 7} items.\n" for i in range(200)))
    spawn(W.live_exchange_check, str(tmp_path), str(model), str(docs), pairs)
    # 3 steps x 32 rows x 32 floats (and as many of the target) sent to the other rank (the own
    # part stays put), each way.
    sent = 3 * 32 * 32 * 4 * (2 if pairs else 1)
    assert [int((tmp_path / f"ok{r}").read_text()) >= sent for r in range(2)] == [True, True]


def test_hookpoint_parallel_from_a_buffer_equals_one_process(tmp_path, tiny_gpt2):
    """Each rank opens only its hook point's shards and trains that SAE exactly as one process
    training every hook point's SAE does."""
    from sae.runners.config import compose_harvest_config, compose_train_config
    from sae.runners.harvest import harvest_to_buffer
    from sae.runners.train import run_training
    from sae.train.artifact import load_sae

    model = tiny_gpt2
    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"Line {i}: a frozenset holds {i % 5} items.\n" for i in range(300)))
    h = compose_harvest_config([f"model.name={model}", f"text.name={docs}", "text.context_length=32",
                                "harvest.progress=false", f"writer.out_dir={tmp_path / 'buf'}",
                                "writer.shard_tokens=1024", "hookpoints=[layers.0,layers.1]"])
    harvest_to_buffer(h.model, h.text, h.harvest, h.writer, h.hookpoints)
    common = ["data=buffer", f"data.buffer.path={tmp_path / 'buf'}", "data.hookpoints=[layers.0,layers.1]",
              "train=smoke", "train.steps=6", "train.batch_size=128", "train.progress=false", "sae.k=4",
              "sae.expansion_factor=2", "train.final_report=false"]
    single = run_training(compose_train_config([*common, f"train.out_dir={tmp_path / 'one'}"]))
    spawn(W.hookpoint_parallel_run, str(tmp_path), [*common, f"train.out_dir={tmp_path / 'two'}"])
    # Names are dealt round-robin in sorted order: rank 0 trains layers.0, rank 1 layers.1.
    assert [(tmp_path / f"ok{r}").read_text() for r in range(2)] == ["topk@layers.0,topk@layers.1"] * 2
    for name in ("topk@layers.0", "topk@layers.1"):
        a = load_sae(single.final_dirs[name]).state_dict()
        b = load_sae(tmp_path / "two" / "final" / name).state_dict()
        assert_close_state(a, b, atol=0, rtol=0)


def test_latent_parallel_with_grad_accumulation_matches_single_process(tmp_path):
    steps, batch = 6, 64
    extra = {"grad_accum_steps": 2}
    spawn(W.run_strategy, str(tmp_path), "latent", "topk", steps, batch, extra)
    full = consolidate_sae(tmp_path / "run" / "final" / "a")
    ref = single({"a": W.make_sae("topk", 0)}, SyntheticSource(W.SYN, batch), tmp_path / "ref", steps, batch, **extra)
    assert_close_state(full.state_dict(), ref.saes["a"].state_dict())


def test_end_to_end_data_parallel_equals_single_process_on_the_union(tmp_path):
    """train.loss=kl on 2 ranks: replicas stay identical and equal one process reading both ranks'
    contexts each step (every context here has the same number of kept positions)."""
    import json as _json

    from sae.harvest.tiny import save_tiny_model
    from sae.train.end_to_end import ContextSource, EndToEnd

    model = save_tiny_model(tmp_path / "model", "llama", layers=2, hidden=W.D)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(_json.dumps({"text": f"Entry {i} says {i * 7 % 13} keys map to {i % 5} values."}) + "\n"
                            for i in range(120)))
    steps = 4
    spawn(W.e2e_data_parallel, str(tmp_path), str(model), str(docs), steps)
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    assert_close_state(r0, load_file(str(tmp_path / "rank1.safetensors")), atol=0, rtol=0)
    cfg = W.e2e_live_cfg(str(model), str(docs))
    ranks = [ContextSource(cfg, 64, hookpoint="layers.0", rank=r, world_size=2) for r in range(2)]
    ref = single({"a": W.make_sae("topk", 0, selection_dtype="float32")}, W.UnionContexts(ranks), tmp_path / "ref",
                 steps, 128, loss="kl", eval_every=0, objective=EndToEnd(ranks[0], "kl"))
    assert ref.tokens == int((tmp_path / "tokens0").read_text())
    assert_close_state(r0, {f"a.{k}": v for k, v in ref.saes["a"].state_dict().items()})
