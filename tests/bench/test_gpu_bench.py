"""``python -m sae.bench.gpu`` runs end to end (on the CPU here: toy shapes, eager kernels) and
writes every section of its JSON: kernel checks, the step rows with their floor and ratios, the
feed section (harvest vs forward, buffer vs memory, live vs buffer). Figures are not checked: on a
CPU they are not GPU figures."""

from __future__ import annotations

import json

from sae.bench import gpu


def test_gpu_bench_smoke_run(tmp_path, capsys):
    assert gpu.main(["--out", str(tmp_path), "--quick", "--shapes", "32,256,4", "--steps", "2", "--warmup", "1",
                     "--configs", "ours (defaults),ours exact (train.deterministic=true)", "--feed"]) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert all(c["ok"] for c in result["checks"]), [c for c in result["checks"] if not c["ok"]]
    (row,) = result["step"]
    assert row["floor_ms"] > 0 and set(row["variants"]) == {"ours (defaults)", "ours exact (train.deterministic=true)",
                                                             "sparsify"}
    assert row["variants"]["ours (defaults)"]["ms"] > 0 and "skipped" in row["variants"]["sparsify"]
    feed = result["feed"]
    assert feed["harvest_exact"]["identical"] and feed["harvest_exact"]["rows_vs_reference"]["equal"]
    assert feed["harvest"]["ratio"] > 0 and feed["buffer"]["ratio"] > 0 and feed["live"]["ratio"] > 0
    assert "| 32 x 256, 4 | ours (defaults)" in capsys.readouterr().out


def test_a_failing_part_is_reported_and_the_rest_still_runs(tmp_path, capsys, monkeypatch):
    """The GPU run is one short call: a check or a feed part that raises must not lose the table."""
    from sae.bench import gpu_checks, gpu_feed

    def boom(*a, **k):
        raise RuntimeError("simulated CUDA failure")

    monkeypatch.setattr(gpu_checks, "check_fused_adam", boom)
    monkeypatch.setattr(gpu_feed, "harvest_vs_forward", boom)
    monkeypatch.setattr(gpu_feed, "buffer_vs_memory", boom)
    assert gpu.main(["--out", str(tmp_path), "--quick", "--shapes", "32,256,4", "--steps", "1", "--warmup", "1",
                     "--configs", "ours (defaults)", "--feed"]) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    failed = [c for c in result["checks"] if not c["ok"]]
    assert [c["case"] for c in failed] == ["SAEAdam vs unfused sequence (L=4096, D=768, 3 steps)"]
    assert "simulated CUDA failure" in failed[0]["error"]
    assert len(result["checks"]) > 2 and result["step"][0]["variants"]["ours (defaults)"]["ms"] > 0
    assert "simulated" in result["feed"]["harvest"]["error"] and "simulated" in result["feed"]["buffer"]["error"]
    assert "skipped" in result["feed"]["live"]
    out = capsys.readouterr().out
    assert "| 32 x 256, 4 | ours (defaults)" in out and "harvest: FAILED RuntimeError" in out


def test_targets_lines_judge_each_figure():
    row = {"d": 768, "L": 24576, "k": 32, "variants": {"ours (defaults)": {"speedup_vs_sparsify": 2.1,
                                                                            "step_over_floor": 9.0}}}
    big = [{**row, "d": d, "variants": {"ours (defaults)": {"speedup_vs_sparsify": 1.9, "step_over_floor": f}}}
           for d, f in ((2304, 2.4), (4096, 2.6))]
    lines = gpu.targets({"step": [row, *big], "feed": {"harvest": {"ratio": 0.86}, "buffer": {"ratio": 0.8},
                                                       "live": {"error": "x"}}})
    assert lines == [
        "768 x 24576, k=32: ours (defaults) / sparsify tokens/s = 2.10 (target >= 2.0: met)",
        "2304 x 24576, k=32: ours (defaults) / sparsify tokens/s = 1.90 (target >= 2.0: NOT met)",
        "2304 x 24576, k=32: ours (defaults) step / floor = 2.40 (target <= 2.5: met)",
        "4096 x 24576, k=32: ours (defaults) / sparsify tokens/s = 1.90 (target >= 2.0: NOT met)",
        "4096 x 24576, k=32: ours (defaults) step / floor = 2.60 (target <= 2.5: NOT met)",
        "harvest / bare forward = 0.86 (target >= 0.85: met)",
        "training from a buffer / from memory = 0.80 (target >= 0.9: NOT met)",
    ]
