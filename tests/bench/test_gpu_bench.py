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
    assert feed["harvest"]["ratio"] > 0 and feed["buffer"]["ratio"] > 0 and feed["live"]["ratio"] > 0
    assert "| 32 x 256, 4 | ours (defaults)" in capsys.readouterr().out
