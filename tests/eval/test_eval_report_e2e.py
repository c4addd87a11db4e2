"""End to end on the packaged MiniLM: harvest -> train (periodic eval, final report) -> sae-eval -> Chromium.

Checks the final print of the training job (FVU, L0, dead %, spliced-model figure, report path),
the ``sae-eval`` command and its report.json, and that report.html renders in headless Chromium
with every plot decoded and every image/table area non-blank.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from sae.buffer.config import WriterConfig
from sae.eval.screenshot import check_report, find_browser, page_marks
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.runners.config import compose_train_config
from sae.runners.harvest import harvest_to_buffer
from sae.runners.train import format_summary, run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("e2e")
    text = root / "text.txt"
    text.write_text("\n".join(topics[k][:600].replace("\n", " ") for k in sorted(topics)[:40]))
    buf = root / "buffer"
    harvest_to_buffer(ModelConfig(device="cpu"), TextConfig(name=str(text), context_length=32),
                      HarvestConfig(batch_size=8, max_tokens=900, progress=False),
                      WriterConfig(out_dir=str(buf), shard_tokens=300), ["layers.3"])
    run = compose_train_config([
        "data=buffer", f"data.buffer.path={buf}", "data.normalize=scale", "train=smoke", "train.steps=30",
        "train.batch_size=64", "train.log_every=5", "train.eval_every=10", "train.eval_batches=1",
        "train.final_report=true", f"train.out_dir={root / 'run'}", "train.progress=false", "train.device=cpu",
        "sae.expansion_factor=2", "sae.k=8",
    ])
    result = run_training(run)
    return root, result


def test_training_logs_periodic_eval_and_prints_the_full_summary(trained):
    root, result = trained
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fvu/topk" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(0 < r["eval/fvu/topk"] < 5 and r["eval/l0/topk"] == pytest.approx(8.0) for r in evals)
    text = format_summary(result)
    line = next(x for x in text.splitlines() if x.strip().startswith("topk:"))
    for pattern in (r"fvu=\d+\.\d{4}", r"l0=8\.0", r"dead=\d+\.\d%", r"embedding cos=0\.\d{4}",
                    r"report: \S+report\.html"):
        assert re.search(pattern, line), (pattern, line)
    report = json.loads(result.reports["topk"].report_json.read_text())
    assert report["metrics"]["fvu"] == pytest.approx(float(re.search(r"fvu=(\S+)", line).group(1)), abs=1e-4)


def test_sae_eval_command_writes_a_complete_report(trained, tmp_path):
    root, _ = trained
    out = tmp_path / "ev"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", "from sae.runners.cli import eval_main; eval_main()",
                           f"sae_path={root / 'run'}", f"out_dir={out}", "device=cpu", "splice.contexts=4",
                           "examples.num_latents=4", "examples.per_latent=3"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"fvu=\S+ l0=8\.0 dead=\S+% embedding cos=\S+ .*report: .*report\.html", proc.stdout)
    r = json.loads((out / "report.json").read_text())
    m, n_lat = r["metrics"], r["sae"]["num_latents"]
    assert r["data"]["source"] == "buffer" and r["data"]["shards"] == [2]  # the held-out shard only
    assert m["tokens"] == 300 and m["l0"] == pytest.approx(8.0)
    assert sum(r["l0_histogram"]) == 300
    assert sum(r["density_histogram"]["counts"]) + r["density_histogram"]["dead"] == n_lat
    assert m["dead_fraction"] == pytest.approx(r["density_histogram"]["dead"] / n_lat)
    sp = r["splice"]
    assert sp["kind"] == "encoder" and sp["contexts"] == 4
    assert 0 < sp["metrics"]["pooled_cosine_sae"] <= 1 and sp["metrics"]["hidden_fvu_zero"] > 0
    assert len(r["examples"]) == 4
    for le in r["examples"]:
        for ex in le["examples"]:
            assert ex["acts"][ex["focus"]] == pytest.approx(ex["value"]) == pytest.approx(max(ex["acts"]))
        assert le["examples"][0]["value"] == pytest.approx(le["max_activation"])
    assert r["versions"]["torch"] and r["config"]["splice"]["contexts"] == 4
    assert set(r["plots"].values()) == {"density.png", "l0.png", "freq_vs_norm.png", "training.png"}
    assert all((out / p).stat().st_size > 1000 for p in r["plots"].values())


@pytest.fixture
def browser():
    if find_browser() is None:
        pytest.skip("no Chromium on PATH: run `bash launch/setup.sh` as root (installs Debian chromium) "
                    "or install chromium")


def test_report_renders_in_headless_chromium(trained, browser, tmp_path):
    root, result = trained
    html = result.reports["topk"].report_html
    check = check_report(html, tmp_path / "shot.png")
    assert check.images == 4 and check.images_ok == 4
    assert len(check.table_boxes) == 2 and not check.blank, check
    # Each sampled latent's dashboard: histogram, "not a causal LM" note, decoder neighbours; all
    # inside the (whole-page) screenshot and drawn.
    n = len(result.reports["topk"].report["examples"])
    assert n > 0 and len(check.panel_boxes) == 3 * n
    assert all(y + h <= check.screenshot_height for _, y, _, h in check.panel_boxes)
    assert check.ok
    # A corrupted plot is caught: the page reports it and the check fails.
    broken = tmp_path / "broken.html"
    broken.write_text(html.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    marks = page_marks(broken)
    assert (marks.images_ok, marks.images) == (3, 4)
    # A panel that draws nothing is caught as blank.
    emptied = tmp_path / "empty_panel.html"
    emptied.write_text(html.read_text().replace("<div class='panel'>", "<div class='panel' style='visibility:hidden'>",
                                                1))
    assert len(check_report(emptied, tmp_path / "shot2.png").blank) == 1
