"""``python -m sae.bench.end_to_end`` at a toy size: each loss trains in its own process and the
table prints time and memory per token against MSE."""

from __future__ import annotations

import json

from sae.bench import end_to_end


def test_end_to_end_bench_prints_cost_against_mse(tiny_gpt2, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Item {i} maps key {i % 11} to value {i % 7} here."}) + "\n"
                            for i in range(200)))
    end_to_end.main(["--model", str(tiny_gpt2), "--hookpoint", "layers.0", "--losses", "mse,kl", "--batch", "64",
                     "--context", "32", "--steps", "2", "--warmup", "1", "--expansion", "2", "--k", "4",
                     "--text", str(docs)])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| train.loss")}
    assert list(rows) == ["mse", "kl"]
    assert rows["mse"][3].strip() == "1.00x" and rows["kl"][3].strip().endswith("x")
    assert 0 < float(rows["kl"][0]) and 40 <= float(rows["kl"][1]) <= 64  # s/step; the kept positions of 2 contexts
