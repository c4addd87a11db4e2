"""``python -m sae.bench.kl_finetune`` at a toy size: MSE-only vs MSE then a KL fine-tune on later
text, both scored by sae-eval's splice code on the same held-out contexts."""

from __future__ import annotations

import json

from sae.bench import kl_finetune


def test_kl_finetune_bench_compares_the_recipes_on_the_same_heldout_text(tiny_gpt2, tmp_path, capsys):
    out, docs = tmp_path / "ft", tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Item {i} maps key {i % 11} to value {i % 7} here."}) + "\n"
                            for i in range(800)))
    kl_finetune.main(["--model", str(tiny_gpt2), "--hookpoint", "layers.0", "--tokens", "2560", "--batch", "128",
                      "--context", "32", "--heldout", "8", "--expansion", "2", "--k", "4", "--text", str(docs),
                      "--mixing-tokens", "256", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| mse, 2,560 tokens |" in text and "| mse, 2,048 tokens |" in text
    assert "| mse 2,048 + kl 512 tokens (lr 0.0003) |" in text and "CE-loss gap:" in text
    ft_cfg = json.loads((out / "kl" / "final" / "finetune" / "cfg.json").read_text())
    # The fine-tune read text after the contexts the MSE part harvested (mixing blocks of 64 contexts).
    skip = ft_cfg["data"]["live"]["skip_contexts"]
    assert skip == kl_finetune.contexts_read(out / "mse_part", 64) and skip % 64 == 0 and 2048 / 32 <= skip <= 192
    scored = {json.loads((out / n / "final" / s / "eval" / "report.json").read_text())["splice"]["metrics"]["tokens"]
              for n, s in (("mse", "topk"), ("kl", "finetune"))}
    assert len(scored) == 1  # the same held-out tokens
