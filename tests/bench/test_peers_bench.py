"""The peer benchmark's machinery (``python -m sae.bench.peers``) at a tiny size.

Random d=384 activations, a few steps per system: every system trains in its own process with its
own library, is loaded back by our importer and scored by our evaluator, and the results JSON
holds every row with numbers that make sense. The full-size figures come from a real run, never
from here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from sae.bench import peers
from sae.bench.peer_data import write_activation_file

ROOT = Path(__file__).resolve().parents[2]
D, BATCH, STEPS = 384, 256, 8


def _activation_file(path: Path) -> Path:
    """Sparse mixtures of 1536 random directions plus noise and an offset, like a residual stream."""
    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(1536, D, generator=gen) / D**0.5

    def rows(n: int) -> torch.Tensor:
        codes = (torch.rand(n, 1536, generator=gen) < 0.01) * torch.rand(n, 1536, generator=gen) * 4
        return codes @ dirs + 0.05 * torch.randn(n, D, generator=gen) + 0.5

    return write_activation_file(path, rows(STEPS * BATCH), rows(1024), {"model": "random", "hookpoint": "none",
                                                                         "corpus": "synthetic"})


def _args(tmp_path: Path, *extra: str):
    data = _activation_file(tmp_path / "acts.safetensors")
    return peers.parser().parse_args([
        "--activations", str(data), "--out", str(tmp_path / "out"), "--train-tokens", str(STEPS * BATCH),
        "--batch", str(BATCH), "--k", "8", "--expansion", "2", "--threads", "1", "--timing-warmup", "1",
        "--warmup-steps", "2", "--lr", "1e-3", *extra])


def _check_trained(row: dict, system: str, arch: str) -> None:
    assert row["status"] == "ok", row.get("reason")
    assert (row["system"], row["arch"], row["num_latents"], row["threads"]) == (system, arch, 2 * D, 1)
    assert len(row["step_seconds"]) == row["steps"] - 1
    assert 0 < row["median_step_s"] < 30
    assert row["tokens_per_s"] == pytest.approx(BATCH / row["median_step_s"])
    assert row["peak_rss_mib"] >= row["rss_start_mib"] > 50


def _peers_python() -> str:
    reason = os.environ.get("SAE_PEERS_UNAVAILABLE")
    if reason:
        pytest.skip(f"peer libraries unavailable: {reason}")
    py, why = peers.find_peers_python()
    if py is None:
        pytest.skip(why)
    return py


@pytest.mark.peers
def test_peer_bench_trains_evaluates_and_reports_every_system(tmp_path):
    _peers_python()
    results = peers.run(_args(tmp_path, "--archs", "topk", "--scaling", "2", "--systems", "ours,saelens,sparsify"))

    rows = {(r["system"], r["arch"]): r for r in results["main"]}
    assert set(rows) == {("ours", "topk"), ("saelens", "topk"), ("sparsify", "topk")}
    fmt = {"ours": "ours", "saelens": "saelens", "sparsify": "sparsify"}
    for (system, arch), r in rows.items():
        _check_trained(r, system, arch)
        assert r["format"] == fmt[system] and r["loaded_as"] == "topk"  # each library's own save format
        assert 0 < r["fvu"] < 10 and math.isfinite(r["fvu"])  # 8 steps: SAELens starts from b_dec = 0
        assert 0 < r["l0"] <= 8 and 0 <= r["dead_fraction"] < 1
        assert r["eval_tokens"] == 1024
    assert rows[("saelens", "topk")]["library"].startswith("sae-lens 6.")
    assert rows[("sparsify", "topk")]["library"].startswith("eai-sparsify ")

    (scaling,) = results["scaling"]  # at the main width the scaling row is the main run itself
    assert scaling["expansion"] == 2 and scaling["matmul_ms"] > 0
    assert {s: r["median_step_s"] for s, r in scaling["systems"].items()} == {
        s: rows[(s, "topk")]["median_step_s"] for s in ("ours", "saelens", "sparsify")}

    (checks,) = results["targets"].values()
    assert len(checks) == 5 and all(t["value"] is not None and t["met"] in (True, False) for t in checks)
    assert checks[-2]["target"] == "tokens/s >= 2x sparsify's"
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["main"] == json.loads(json.dumps(results["main"]))
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| saelens | topk |" in md and "| sparsify | topk |" in md and "## Targets" in md


def test_peer_bench_skips_a_missing_peer_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_PEERS_PYTHON", str(tmp_path / "no-such-venv" / "python"))
    results = peers.run(_args(tmp_path, "--archs", "topk", "--scaling", ""))

    status = {r["system"]: r for r in results["main"]}
    _check_trained(status["ours"], "ours", "topk")
    _check_trained(status["ours-fp32"], "ours-fp32", "topk")
    for peer in ("saelens", "sparsify"):
        assert status[peer]["status"] == "skipped"
        assert "SAE_PEERS_PYTHON" in status[peer]["reason"] and "does not exist" in status[peer]["reason"]
    assert set(results["targets"]) == {"ours", "ours-fp32"}
    assert all(t["met"] is None for checks in results["targets"].values() for t in checks)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "not measured" in md and "skipped" in md


def test_peer_splice_scores_any_sae_in_the_causal_lm(tiny_gpt2):
    """--splice-contexts: CE loss recovered and KL of an SAE spliced into a causal LM on held-out contexts
    (the same splice code as sae-eval); an exact reconstruction recovers everything, noise does not."""
    from sae.bench.peer_splice import splice_metrics, splice_setup
    from sae.models import SAEConfig, build_sae

    setup = splice_setup(str(tiny_gpt2), "layers.0", heldout_every=8, contexts=4)
    assert len(setup.batches) == 1 and setup.batches[0].input_ids.shape[0] == 4 and setup.tokens > 0
    sae = build_sae(SAEConfig(num_latents=128, k=8), 32, seed=0)
    noisy = splice_metrics(setup, sae)
    assert set(noisy) == {"ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_loss_recovered", "kl_div_sae"}
    assert all(v == v for v in noisy.values()) and noisy["kl_div_sae"] > 0

    class Exact(torch.nn.Module):  # reconstructs its input exactly: the spliced model is the clean one
        d_out = 32

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            return x

        def reconstruct(self, x, codes):
            return codes

    exact = splice_metrics(setup, Exact())
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["kl_div_sae"] == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="needs a causal LM"):
        splice_setup("all-MiniLM-L6-v2", "layers.3", heldout_every=8, contexts=2)
