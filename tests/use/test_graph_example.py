"""The README's attribution-graph example runs as written (in a scratch folder): skip transcoders for every
MLP of SmolLM2 from one live pass, ``sae-export --format circuit-tracer``, and circuit-tracer 0.5.0
(unmodified, in the peers venv) computing a graph and its replacement / completeness scores, through
``sae-graph``; then ``sae-eval`` of the same folder (per-layer FVU, the replacement model's CE, graph
scores over two prompts)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = [pytest.mark.slow, pytest.mark.peers]


def _block(text: str, marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```\n<!-- /{marker} -->", text, re.S)
    assert m, f"the README lost its {marker} block"
    return m.group(1)


def _peers_python() -> str:
    from sae_peers.venv import find_peers_python

    reason = os.environ.get("SAE_PEERS_UNAVAILABLE")
    if reason:
        pytest.skip(f"peer libraries unavailable: {reason}")
    py, why = find_peers_python()
    if py is None:
        pytest.skip(why)
    return py


def test_readme_graph_example(tmp_path):
    _peers_python()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", _block(README.read_text(), "graph-example")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # One transcoder per layer, each logged with its own held-out FVU.
    fvus = [float(v) for v in re.findall(r"jumprelu@layers\.\d+\.mlp_in: fvu=([\d.]+)", out)]
    assert len(fvus) == 30 and max(fvus) < 1.0, out[-3000:]
    ct = tmp_path / "runs/graph-example-ct"
    assert sorted(p.name for p in ct.glob("layer_*.safetensors")) == sorted(f"layer_{i}.safetensors" for i in range(30))
    # circuit-tracer's own scores of one prompt's graph, printed and saved.
    graph = json.loads((tmp_path / "runs/graph-example-graph/graph_scores.json").read_text())
    row = graph["prompts"][0]
    print(f"README graph example: replacement {row['replacement_score']:.4f}, completeness "
          f"{row['completeness_score']:.4f}, {row['active_features']} active features")
    assert graph["versions"]["circuit_tracer"] == "0.5.0" and graph["logit_max_abs_diff_vs_hf"] < 1e-3
    assert row["tokens"] == 6 and row["active_features"] > 0 and row["logits"] >= 1
    assert 0.0 < row["replacement_score"] <= 1.0 and 0.0 < row["completeness_score"] <= 1.0
    assert f"| {row['replacement_score']:.4f} | {row['completeness_score']:.4f} |" in out
    # sae-eval of the folder: per-layer FVU equal to training's (same raw rows differ: only a sanity
    # bound), the replacement model's CE, and graph scores for the two prompts.
    report = json.loads((ct / "eval/report.json").read_text())
    assert len(report["layers"]) == 30 and report["graph"]["prompts"][0]["prompt"] == row["prompt"]
    assert len(report["graph"]["prompts"]) == 2
    m = report["metrics"]
    assert m["fvu"] < 1.0 and 0.0 < m["ce_loss_recovered"] <= 1.0 and m["kl_div"] > 0
    assert report["graph"]["prompts"][0]["replacement_score"] == pytest.approx(row["replacement_score"], abs=1e-4)
    assert re.search(r"30 layers: mean fvu=[\d.]+ .* replacement model CE recovered=[\d.]+ KL=[\d.]+ graph "
                     r"replacement=[\d.]+ completeness=[\d.]+ \(2 prompts\)", out)
