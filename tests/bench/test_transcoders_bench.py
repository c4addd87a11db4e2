"""``python -m sae.bench.transcoders`` end to end at a toy size (tiny GPT-2, a few steps): the
activation file holds aligned input/target splits, every family trains and is scored in raw space."""

from __future__ import annotations

import argparse
import json
import math

import torch
from safetensors.torch import load_file

from sae.bench import transcoders


def test_transcoder_bench_runs_every_requested_family(tiny_gpt2, tmp_path):
    out = tmp_path / "bench"
    transcoders.main(["--model", str(tiny_gpt2), "--layer", "0", "--out", str(out), "--train-tokens", "1024",
                      "--heldout-tokens", "256", "--steps", "3", "--batch", "256", "--families", "topk,relu",
                      "--no-sparsify"])
    data = load_file(str(out / "activations.safetensors"))
    before = {k: v.clone() for k, v in data.items()}
    assert data["train"].shape == data["train_y"].shape == (1024, 32) and data["heldout"].shape[0] == 256
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["system"] for r in rows] == ["ours topk", "ours relu"]
    assert [r["normalised"] for r in rows] == [True, False]  # data.normalize=auto per family
    assert all(math.isfinite(r["fvu"]) and r["l0"] > 0 for r in rows)
    assert "| ours topk |" in (out / "results.md").read_text()
    # A family's normalisation never leaks into the next family's data (Normalizer works in place).
    args = argparse.Namespace(expansion=2, k=4, batch=256, steps=2)
    result = transcoders.train_ours("topk", data, args, tmp_path / "again")
    assert result["normalised"] and all(torch.equal(before[k], data[k]) for k in before)
