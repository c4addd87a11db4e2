"""Transcoders on a real causal LM: every family of ours with its defaults, against sparsify's TopK
transcoder, on the same rows and batches.

    python -m sae.bench.transcoders [--out runs/bench_transcoders] [--layer 10] [--steps 300]

1. Activations: SmolLM2-135M (``model=smollm2``) over the built-in corpus; layer L's MLP input
   (after ``post_attention_layernorm``, ``layers.L.mlp_in``) and its output (``layers.L.mlp``) for
   the same tokens, split by context (:func:`sae.bench.peer_data.harvest_splits`) into
   ``<out>/activations.safetensors`` (``train``/``train_y`` shuffled once, ``heldout``/``heldout_y``).
2. Ours: each family (``sae=<family> sae.transcode=true``, expansion 8, k 32, nothing else tuned)
   is trained by our :class:`~sae.train.trainer.Trainer` on the train split in file order, on data
   normalised as ``data.normalize=auto`` does for that family; the normalisation is then folded into
   the weights (:func:`sae.export.fold.fold_normalization`), as an export would.
3. sparsify: its own ``Trainer`` (``sae_peers.sparsify`` in ``.venv-peers``) on the same batches in the
   same order; its saved coder is imported by our reader.
4. One evaluator scores every system on the held-out split in the model's raw space: FVU, L0 and the
   fraction of latents that never fired. Benchmarks print figures; they are not tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from sae_peers.venv import find_peers_python, peer_command, peer_env
from safetensors.torch import load_file, save_file

from sae.bench.peer_data import harvest_splits
from sae.buffer.normalize import Normalizer, activation_sums
from sae.buffer.source import Batch
from sae.buffer.tensor_source import TensorSource
from sae.eval.quick import evaluate_batches
from sae.export.fold import fold_normalization
from sae.export.load import load_pretrained_with_info
from sae.models import SAEConfig, build_sae
from sae.models.registry import sae_class
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer

FAMILIES = ("topk", "batchtopk", "matryoshka_topk", "matryoshka_batchtopk", "jumprelu", "gated", "relu")


def activations(out: Path, layer: int, train_tokens: int, heldout_tokens: int, batch: int,
                model: str = "smollm2") -> dict[str, Any]:
    """The benchmark's activation file (made once, reused while the request matches)."""
    path = out / "activations.safetensors"
    want = {"model": model, "layer": layer, "train_tokens": train_tokens, "heldout_tokens": heldout_tokens,
            "batch": batch}
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            info = json.loads(fh.metadata()["info"])
        if info.get("request") == want:
            return {"path": path, **info}
    x_hp, y_hp = f"layers.{layer}.mlp_in", f"layers.{layer}.mlp"
    splits, info = harvest_splits(train_tokens, heldout_tokens, batch, hookpoints=[x_hp, y_hp], model=model,
                                  context_length=128)
    info = {**info, "request": want, "input": x_hp, "target": y_hp}
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"train": splits[x_hp][0], "train_y": splits[y_hp][0], "heldout": splits[x_hp][1],
               "heldout_y": splits[y_hp][1]}
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(path), metadata={"info": json.dumps(info)})
    return {"path": path, **info}


def heldout_batches(data: dict[str, torch.Tensor], size: int = 4096) -> list[Batch]:
    x, y = data["heldout"], data["heldout_y"]
    return [Batch(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def train_ours(family: str, data: dict[str, torch.Tensor], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One family with its defaults; returns held-out figures of the folded (raw-space) SAE."""
    x, y = data["train"], data["train_y"]
    norm = None
    if sae_class(family).normalize_transcoder_data:  # what data.normalize=auto does for this family
        nx = Normalizer.from_sums("scale", activation_sums(x), "input")
        ny = Normalizer.from_sums("scale", activation_sums(y), "target")
        x, y, norm = nx(x.clone()), ny(y.clone()), {"x": nx.as_dict(), "y": ny.as_dict()}  # normalises in place
    cfg = SAEConfig(architecture=family, transcode=True, expansion_factor=args.expansion, k=args.k)
    sae = build_sae(cfg, x.shape[1], y.shape[1], seed=0)
    train = TrainConfig(batch_size=args.batch, steps=args.steps, out_dir=str(out / f"ours-{family}"), resume=False,
                        progress=False, eval_every=0, final_report=False, log_every=50)
    trainer = Trainer(train, {family: sae}, TensorSource(x, y, args.batch, shuffle=False))
    stamps: list[float] = []
    trainer.step_hooks.append(lambda _: stamps.append(time.perf_counter()))
    trainer.fit()
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    folded = fold_normalization(sae, norm) if norm else sae
    m = evaluate_batches(folded, heldout_batches(data))
    return {"system": f"ours {family}", "fvu": m["fvu"], "l0": m["l0"], "dead": m["dead_fraction"],
            "s_per_step": steps[len(steps) // 2], "normalised": norm is not None}


def train_sparsify(info: dict[str, Any], data: dict[str, torch.Tensor], args: argparse.Namespace,
                   out: Path) -> dict[str, Any]:
    python, why = find_peers_python()
    if python is None:
        return {"system": "sparsify topk", "skipped": why}
    run_dir = out / "sparsify-topk"
    run_dir.mkdir(parents=True, exist_ok=True)
    d = data["train"].shape[1]
    job = {"system": "sparsify", "data": str(info["path"]), "out_dir": str(run_dir), "arch": "topk", "transcode": True,
           "num_latents": args.expansion * d, "k": args.k, "batch": args.batch, "steps": args.steps, "lr": args.lr,
           "warmup_steps": 10, "auxk_alpha": 1 / 32, "dead_tokens": 10_000_000, "threads": args.threads, "seed": 0,
           "timing_warmup": 2}
    (run_dir / "job.json").write_text(json.dumps(job, indent=1))
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.run(peer_command(python, "sparsify", run_dir / "job.json"), env=peer_env(dict(os.environ)),
                            stdout=log, stderr=subprocess.STDOUT).returncode
    result_path = run_dir / "result.json"
    if rc != 0 or not result_path.is_file():
        return {"system": "sparsify topk", "skipped": f"exit {rc}; see {run_dir / 'log.txt'}"}
    result = json.loads(result_path.read_text())
    loaded = load_pretrained_with_info(result["weights"])
    m = evaluate_batches(loaded.sae, heldout_batches(data))
    return {"system": f"sparsify topk ({result.get('library', 'sparsify')})", "fvu": m["fvu"], "l0": m["l0"],
            "dead": m["dead_fraction"], "s_per_step": result.get("median_step_s", float("nan")), "normalised": False}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| system | held-out FVU | L0 | dead | median s/step | trained on |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['system']} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(f"| {r['system']} | {r['fvu']:.4f} | {r['l0']:.1f} | {100 * r['dead']:.1f}% | "
                     f"{r['s_per_step']:.3f} | {'normalised' if r['normalised'] else 'raw'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_transcoders")
    p.add_argument("--model", default="smollm2", help="a causal LM (default: the packaged SmolLM2-135M)")
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--train-tokens", type=int, default=108 * 1024)
    p.add_argument("--heldout-tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help="sparsify's lr; default: the rule both use, 2e-4 / sqrt(num_latents / 2^14)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--no-sparsify", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    info = activations(out, args.layer, args.train_tokens, args.heldout_tokens, args.batch, args.model)
    data = load_file(str(info["path"]))
    if args.lr is None:
        args.lr = 2e-4 / math.sqrt(args.expansion * data["train"].shape[1] / 2**14)
    print(f"{args.model} {info['input']} -> {info['target']}: {data['train'].shape[0]} training rows (cycled over "
          f"{args.steps} steps of {args.batch}), {data['heldout'].shape[0]} held-out rows; {args.expansion}x "
          f"({args.expansion * data['train'].shape[1]} latents), k={args.k}", flush=True)
    rows = []
    for family in args.families.split(","):
        rows.append(train_ours(family, data, args, out))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    if not args.no_sparsify:
        rows.append(train_sparsify(info, data, args, out))
    text = table(rows)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"info": {k: str(v) for k, v in info.items()}, "rows": rows},
                                                 indent=1))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
