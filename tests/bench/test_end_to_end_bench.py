"""``python -m sae.bench.end_to_end`` at a toy size: each loss's figures and the table of time and
memory per token against MSE (``measure`` in this process; the command runs each in its own)."""

from __future__ import annotations

import json

from sae.bench import end_to_end


def test_end_to_end_bench_measures_each_loss_and_prints_cost_against_mse(tiny_gpt2, tmp_path, monkeypatch, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Item {i} maps key {i % 11} to value {i % 7} here."}) + "\n"
                            for i in range(200)))
    kw = dict(model=str(tiny_gpt2), hookpoint="layers.0", batch=64, context=32, steps=2, warmup=1, expansion=2, k=4,
              text=str(docs))
    rows = [end_to_end.measure(loss, **kw) for loss in ("mse", "kl")]
    assert [r["loss"] for r in rows] == ["mse", "kl"]
    assert rows[0]["tokens_per_step"] == 64 and 40 <= rows[1]["tokens_per_step"] <= 64  # kept positions of 2 contexts
    assert all(r["s_per_step"] > 0 and r["peak_rss_mib"] >= r["model_rss_mib"] > 0 for r in rows)
    monkeypatch.setattr(end_to_end, "run", lambda losses, **_: rows)  # the command's processes, measured above
    end_to_end.main(["--model", str(tiny_gpt2), "--hookpoint", "layers.0", "--losses", "mse,kl", "--batch", "64",
                     "--context", "32"])
    table = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ") and not line.startswith("| train.loss")}
    assert list(table) == ["mse", "kl"] and table["mse"][3].strip() == "1.00x"
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    assert table["kl"][3].strip() == f"{ratio:.2f}x"


def test_end_to_end_bench_runs_each_loss_in_its_own_process(monkeypatch):
    calls = []

    class Done:
        returncode, stderr = 0, ""

        def __init__(self, args):
            calls.append(args)
            self.stdout = json.dumps({"loss": args[args.index("--one") + 1]}) + "\n"

    monkeypatch.setattr(end_to_end.subprocess, "run", lambda args, **_: Done(args))
    rows = end_to_end.run(["mse", "kl"], model="m", batch=64)
    assert [r["loss"] for r in rows] == ["mse", "kl"] and len(calls) == 2
    assert calls[1][-2:] == ["--model=m", "--batch=64"]
