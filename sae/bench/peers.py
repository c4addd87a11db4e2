"""Side-by-side benchmark against SAELens and sparsify: speed, memory and SAE quality on the same activations.

    python -m sae.bench.peers [--out runs/bench_peers] [--train-tokens 491520] [--threads 2]
    python -m sae.bench.peers --model smollm2 --hookpoint layers.15 --splice-contexts 32 --archs topk

Installs nothing. The peers run in their own virtual environment (``bash launch/peers_env.sh``
creates ``.venv-peers`` with sae-lens and eai-sparsify next to the same torch); its python is
``$SAE_PEERS_PYTHON`` or ``.venv-peers/bin/python``. A missing venv or library skips that peer
with a message.

1. Activations (:mod:`.peer_data`): the packaged MiniLM's ``layers.3`` residual (``--model``,
   ``--hookpoint``: e.g. SmolLM2's ``layers.15``) over the built-in corpus, harvested once by our
   harvester into ``<out>/activations.safetensors`` (train split shuffled once, held-out split of
   other contexts); reused when it matches the request.
2. Training: every system trains in its own process (so peak RSS is its own) with its own
   training classes (runners :mod:`.peer_ours`, ``sae_peers.saelens``, ``sae_peers.sparsify``) on the
   same batches in the same order: same width, k, batch, token budget, Adam, lr and schedule
   (linear warm-up, linear decay to 0), AuxK weight, dead-latent window and thread count.
   TopK for all three; BatchTopK and JumpReLU for ours and SAELens. ``ours`` is our trainer with
   its defaults (``sae.selection_dtype=auto``: bf16 selection where the CPU has bf16 units, see
   :mod:`sae.models.precision`; values, gradients, weights and Adam in fp32); ``ours-fp32`` pins
   ``sae.selection_dtype=float32`` (exact selection, the default before ``auto``).
3. Evaluation: each system's saved weights are loaded into our classes by our importer
   (:func:`sae.export.load.load_pretrained_with_info`) and scored by one evaluator
   (:func:`sae.eval.quick.evaluate_batches`) on the held-out split: FVU, L0, dead fraction
   (never fired on held-out); with ``--splice-contexts N`` on a causal LM, also CE loss recovered
   and KL of the model with each SAE spliced in, on N held-out contexts by the evaluator's splice
   code (:mod:`.peer_splice`).
4. Scaling: TopK step time at 4x, 16x and 64x latents (fixed k) for each system, next to the
   time of the encoder product ``x @ W_enc^T`` alone; ``--scaling-steps`` steps per run, and the
   main runs themselves at the main width.

Prints both tables with ratios ours/peer and the issue's targets, and writes
``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sae_peers.runtime import ActivationFile
from sae_peers.venv import find_peers_python, peer_command, peer_env

from sae.bench import peer_report
from sae.bench.common import median_time
from sae.bench.peer_data import harvest_split, write_activation_file
from sae.bench.peer_splice import SpliceSetup, splice_metrics, splice_setup
from sae.buffer.source import Batch
from sae.eval.quick import evaluate_batches
from sae.export.load import load_pretrained_with_info
from sae.models import token_variance

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# system -> (runner, extra job settings, architectures it trains)
SYSTEMS = {
    "ours": ("ours", {}, ("topk", "batchtopk", "jumprelu")),
    "ours-fp32": ("ours", {"selection_dtype": "float32"}, ("topk", "batchtopk")),
    "saelens": ("saelens", {}, ("topk", "batchtopk", "jumprelu")),
    "sparsify": ("sparsify", {}, ("topk",)),
}


@dataclass
class Setup:
    """What every system shares in one benchmark run."""

    data: str
    d: int
    batch: int = 4096
    k: int = 32
    lr: float = 4e-4
    warmup_steps: int = 10
    auxk_alpha: float = 1.0 / 32.0
    dead_tokens: int = 65536
    threads: int = 2
    seed: int = 0
    timing_warmup: int = 2
    l0_coefficient: float = 2e-3
    jumprelu_bandwidth: float = 0.05
    sparsity_warmup_steps: int = 10
    variance: float = 1.0
    """Total variance per token of the training data (SAELens' JumpReLU coefficient is in its units)."""
    act_scale: float = 1.0
    """sqrt(variance / d): our JumpReLU bandwidth unit."""


def run_system(setup: Setup, system: str, arch: str, num_latents: int, steps: int, out: Path,
               peers: tuple[str | None, str]) -> dict[str, Any]:
    """Train one system in a subprocess; its result.json, or a record saying why it was skipped or failed."""
    run_dir = out / "runs" / f"{system}-{arch}-L{num_latents}"
    base = {"system": system, "arch": arch, "num_latents": num_latents, "steps": steps}
    runner, options, _ = SYSTEMS[system]
    peers_python, why = peers
    if runner != "ours" and peers_python is None:
        return {**base, "status": "skipped", "reason": why}
    job = {**asdict(setup), **options, **base, "out_dir": str(run_dir)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)
    (run_dir / "job.json").write_text(json.dumps(job, indent=2))
    cmd = ([sys.executable, "-m", "sae.bench.peer_ours", str(run_dir / "job.json")] if runner == "ours"
           else peer_command(peers_python, runner, run_dir / "job.json"))
    env = {**os.environ, "OMP_NUM_THREADS": str(setup.threads), "MKL_NUM_THREADS": str(setup.threads),
           "TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "SPARSIFY_DISABLE_TRITON": "1", "HF_HUB_OFFLINE": "1"}
    if runner != "ours":
        env = peer_env(env)
    t0 = time.perf_counter()
    with open(run_dir / "log.txt", "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if rc == 3 and "skipped" in result:
        return {**base, "status": "skipped", "reason": result["skipped"]}
    if rc != 0 or "median_step_s" not in result:
        tail = (run_dir / "log.txt").read_text()[-2000:]
        return {**base, "status": "failed", "reason": f"exit code {rc}; log {run_dir / 'log.txt'}:\n{tail}"}
    return {**base, **result, "status": "ok", "process_s": time.perf_counter() - t0}


def heldout_batches(data: ActivationFile, batch: int, limit: int) -> list[Batch]:
    """The first ``limit`` held-out rows in batches."""
    n = min(data.shape("heldout")[0], limit)
    return [Batch(data.rows("heldout", s, min(batch, n - s))) for s in range(0, n, batch)]


def evaluate(row: dict[str, Any], batches: list[Batch], splice: SpliceSetup | None = None) -> dict[str, Any]:
    """Load the row's weights with our importer and score them on the held-out split (and spliced
    into the model, given ``splice``)."""
    loaded = load_pretrained_with_info(row["weights"])
    m = evaluate_batches(loaded.sae, batches)
    out = {"format": loaded.format, "loaded_as": loaded.sae.architecture, "fvu": m["fvu"], "l0": m["l0"],
           "dead_fraction": m["dead_fraction"], "cosine": m["cosine"], "eval_tokens": int(m["tokens"])}
    if splice is not None:
        out.update(splice_metrics(splice, loaded.sae), splice_tokens=splice.tokens)
    return out


def encoder_matmul_ms(x: torch.Tensor, num_latents: int, repeats: int = 5) -> float:
    """Median time of ``x @ W_enc^T`` into a fresh [B, L] tensor (the floor of any SAE step)."""
    W = torch.randn(num_latents, x.shape[1]) / x.shape[1] ** 0.5
    return 1e3 * median_time(lambda: x @ W.T, torch.device("cpu"), repeats=repeats)


def prepare_data(args: argparse.Namespace, out: Path) -> Path:
    """The activation file: ``--activations`` as given, or harvested into ``<out>`` (reused when it matches)."""
    if args.activations:
        return Path(args.activations)
    path = out / "activations.safetensors"
    want = {"hookpoint": args.hookpoint, "heldout_every": args.heldout_every, "seed": args.seed,
            "model": args.model}
    if path.is_file():
        info = ActivationFile(path).info
        rows = info.get("train_rows", 0)  # a larger file serves a smaller budget: runners read its first batches
        enough = rows >= args.train_tokens // args.batch * args.batch or rows > info.get("train_rows_available", 0) - \
            args.batch
        if all(info.get(k) == v for k, v in want.items()) and enough and info.get("heldout_rows", 0) >= \
                args.heldout_tokens:
            log.info("reusing %s (%d train rows)", path, info["train_rows"])
            return path
    t0 = time.perf_counter()
    train, heldout, info = harvest_split(args.train_tokens, args.heldout_tokens, args.batch, hookpoint=args.hookpoint,
                                         model=args.model, heldout_every=args.heldout_every, seed=args.seed)
    info["harvest_s"] = time.perf_counter() - t0
    return write_activation_file(path, train, heldout, info)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_peers", help="folder for activations, runs and results")
    p.add_argument("--activations", help="use this activation file (train/heldout fp32 [N, d]) instead of harvesting")
    p.add_argument("--train-tokens", type=int, default=491_520, help="training budget in tokens (all systems)")
    p.add_argument("--heldout-tokens", type=int, default=65_536)
    p.add_argument("--heldout-every", type=int, default=8, help="every N-th context is held out")
    p.add_argument("--hookpoint", default="layers.3")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="the packaged model (or smollm2, a causal LM)")
    p.add_argument("--splice-contexts", type=int, default=0,
                   help="causal LMs: CE loss recovered and KL on this many held-out contexts (0: off)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"any of {', '.join(SYSTEMS)}")
    p.add_argument("--archs", default="topk,batchtopk,jumprelu", help="ours and SAELens; sparsify has TopK only")
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--scaling", default="4,16,64", help="expansion factors of the scaling table ('' skips it)")
    p.add_argument("--scaling-steps", type=int, default=8)
    for name in ("batch", "k", "lr", "warmup_steps", "auxk_alpha", "dead_tokens", "threads", "seed",
                 "timing_warmup", "l0_coefficient", "sparsity_warmup_steps"):
        default = Setup.__dataclass_fields__[name].default
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns what it writes to ``results.json``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    data_path = prepare_data(args, out)
    data = ActivationFile(data_path)
    rows, d = data.shape("train")
    first = data.rows("train", 0, min(rows, args.batch))
    var = float(token_variance(first))
    setup = Setup(data=str(data_path), d=d, batch=args.batch, k=args.k, lr=args.lr, warmup_steps=args.warmup_steps,
                  auxk_alpha=args.auxk_alpha, dead_tokens=args.dead_tokens, threads=args.threads, seed=args.seed,
                  timing_warmup=args.timing_warmup, l0_coefficient=args.l0_coefficient,
                  sparsity_warmup_steps=args.sparsity_warmup_steps, variance=var, act_scale=math.sqrt(var / d))
    peers = find_peers_python()
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    archs = [a for a in args.archs.split(",") if a]
    steps = max(1, args.train_tokens // args.batch)
    held = heldout_batches(data, args.batch, args.heldout_tokens)
    splice = (splice_setup(args.model, args.hookpoint, args.heldout_every, args.splice_contexts)
              if args.splice_contexts > 0 else None)
    main_rows = []
    for arch in archs:
        for system in systems:
            if arch not in SYSTEMS[system][2]:
                continue
            row = run_system(setup, system, arch, args.expansion * d, steps, out, peers)
            if row["status"] == "ok":
                row.update(evaluate(row, held, splice))
            log.info("%s %s: %s", system, arch, row["status"])
            main_rows.append(row)
    scaling = []
    for mult in [int(m) for m in args.scaling.split(",") if m]:
        entry: dict[str, Any] = {"expansion": mult, "num_latents": mult * d,
                                 "matmul_ms": encoder_matmul_ms(first, mult * d), "systems": {}}
        for system in [s for s in systems if "topk" in SYSTEMS[s][2]]:
            same = next((r for r in main_rows if r["system"] == system and r["arch"] == "topk"), None)
            entry["systems"][system] = same if mult == args.expansion and same else run_system(
                setup, system, "topk", mult * d, args.scaling_steps, out, peers)
        scaling.append(entry)
    results = {"setup": asdict(setup), "data": data.info, "train_tokens": steps * args.batch, "steps": steps,
               "epochs": steps * args.batch / rows, "peers_python": peers[0], "main": main_rows,
               "scaling": scaling, "machine": {**peer_report.machine_info(), "load_avg_start": load_start}}
    results["targets"] = {s: peer_report.targets(results, args.expansion, s) for s in ("ours", "ours-fp32")
                          if s in systems and "topk" in archs}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = peer_report.render(results)
    (out / "results.md").write_text(text)
    print(text)
    return results


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
