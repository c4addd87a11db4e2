"""The ``sae-eval`` output folder and report (sae/runners/evaluate.py, sae/eval/report.py) trust nothing.

On a small SAE over synthetic rows: a failed evaluation creates no folder (a path that does not
exist, a bad setting); a failure while writing (a plot that raises) leaves the previous report
byte for byte and no temporary sibling; a folder holding a user's files is refused, not replaced;
non-finite metrics stop with one line naming them and the cause instead of a matplotlib crash; the
HTML shows control characters of token strings as visible escapes and holds none.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from sae.buffer.config import DataConfig
from sae.eval import plots
from sae.eval.config import EvalConfig
from sae.eval.dashboards import Dashboard, TokenEffect
from sae.eval.examples import Example, LatentExamples
from sae.eval.report import render_html
from sae.models import SAEConfig, build_sae
from sae.runners.evaluate import check_finite_metrics, run_eval
from sae.train.artifact import save_sae

SMALL = dict(max_tokens=1024, batch_size=512, device="cpu")


def synthetic_sae(folder, scale_encoder: float = 0.0):
    sae = build_sae(SAEConfig(k=4, num_latents=64), 16, seed=0)
    if scale_encoder:
        with torch.no_grad():
            sae.W_enc.fill_(scale_encoder)
    data = DataConfig()
    data.synthetic.d, data.synthetic.num_features = 16, 32
    return save_sae(sae, folder, data=dataclasses.asdict(data))


def tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_eval_creates_no_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_eval(EvalConfig(sae_path=str(tmp_path / "nonexist" / "x"), **SMALL))
    sae_dir = synthetic_sae(tmp_path / "sae")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="eval.dense_threshold=2.0"):
        run_eval(EvalConfig(sae_path=str(sae_dir), dense_threshold=2.0, **SMALL))
    with pytest.raises(ValueError, match="eval.source='bogus'"):
        run_eval(EvalConfig(sae_path=str(sae_dir), source="bogus", **SMALL))
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["sae"]
    assert sorted(os.listdir(sae_dir)) == ["cfg.json", "sae.safetensors"]


def test_the_command_on_a_missing_path_leaves_nothing_behind(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from sae.runners.cli import eval_main; eval_main()",
                           "sae_path=nonexist/x", "device=cpu"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "SAE_DEBUG": "0"})
    assert proc.returncode == 1 and "sae-eval: error: eval.sae_path='nonexist/x' does not exist" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_a_failure_while_writing_leaves_the_previous_report_untouched(tmp_path, monkeypatch):
    sae_dir = synthetic_sae(tmp_path / "sae")
    first = run_eval(EvalConfig(sae_path=str(sae_dir), **SMALL))
    assert first.out_dir == sae_dir / "eval" and first.report_html.is_file()
    old = tree(sae_dir / "eval")
    assert {"report.json", "report.html", "latents.safetensors", "density.png", "l0.png"} <= set(old)

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "plot_freq_vs_norm", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        run_eval(EvalConfig(sae_path=str(sae_dir), max_tokens=2048, batch_size=512, device="cpu"))
    assert tree(sae_dir / "eval") == old
    assert sorted(os.listdir(sae_dir)) == ["cfg.json", "eval", "sae.safetensors"]  # no temporary sibling left
    monkeypatch.undo()
    again = run_eval(EvalConfig(sae_path=str(sae_dir), max_tokens=2048, batch_size=512, device="cpu", html=False))
    assert again.report["metrics"]["tokens"] == 2048 and again.report_html is None
    new = tree(sae_dir / "eval")  # replaced whole: no report.html of the first run beside the new report
    assert "report.html" not in new and new["report.json"] != old["report.json"]
    assert sorted(os.listdir(sae_dir)) == ["cfg.json", "eval", "sae.safetensors"]


def test_a_folder_holding_other_files_is_refused(tmp_path):
    sae_dir = synthetic_sae(tmp_path / "sae")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"the report folder '.*mine' holds 'notes.txt', which no report writes; .* "
                                         r"set eval.out_dir to a new or empty folder"):
        run_eval(EvalConfig(sae_path=str(sae_dir), out_dir=str(mine), **SMALL))
    assert tree(mine) == {"notes.txt": b"keep me"}
    with pytest.raises(ValueError, match=r"holds 'cfg.json' and 1 more, which no report writes"):
        run_eval(EvalConfig(sae_path=str(sae_dir), out_dir=str(sae_dir), **SMALL))  # never replaces the SAE
    assert sorted(os.listdir(sae_dir)) == ["cfg.json", "sae.safetensors"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run_eval(EvalConfig(sae_path=str(sae_dir), out_dir=str(tmp_path / "file"), **SMALL))
    fresh = run_eval(EvalConfig(sae_path=str(sae_dir), out_dir=str(tmp_path / "new" / "deep"), plots=False, **SMALL))
    assert sorted(os.listdir(fresh.out_dir)) == ["latents.safetensors", "report.html", "report.json"]


def test_non_finite_metrics_stop_with_one_line_naming_them(tmp_path):
    # Finite weights (the loader accepts them) whose encoder overflows float32: NaN/Inf codes.
    sae_dir = synthetic_sae(tmp_path / "sae", scale_encoder=3e38)
    with pytest.raises(ValueError) as e:
        run_eval(EvalConfig(sae_path=str(sae_dir), **SMALL))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("non-finite metrics on the eval rows (fvu=nan")
    assert msg.endswith("its weights are finite, so its encoder or reconstruction overflows float32 on these rows, "
                        "or the rows hold NaN/Inf; check the SAE's scale and the eval data (eval.source, "
                        "eval.buffer_path)")
    assert sorted(os.listdir(sae_dir)) == ["cfg.json", "sae.safetensors"]

    sae = build_sae(SAEConfig(k=4, num_latents=8), 4)
    good = {"fvu": 0.5, "mse": 0.1, "cosine": 0.9, "l0": 4.0, "l1": 3.0, "relative_norm": float("nan")}
    check_finite_metrics(good, torch.ones(8), sae)  # a NaN outside the core metrics is allowed
    with torch.no_grad():
        sae.W_dec[2] = float("inf")
    with pytest.raises(ValueError, match=r"^non-finite metrics on the eval rows \(fvu=inf, decoder norms of 1 "
                                         r"latents\): the SAE's W_dec hold NaN/Inf; evaluate an undamaged checkpoint "
                                         r"or retrain$"):
        check_finite_metrics({**good, "fvu": float("inf")}, plots.decoder_norms(sae.W_dec), sae)


def test_report_html_holds_no_control_characters(tmp_path):
    sae_dir = synthetic_sae(tmp_path / "sae")
    report = run_eval(EvalConfig(sae_path=str(sae_dir), plots=False, html=False, **SMALL)).report
    tokens = ["a\x00b", "\x1b[31m", "tab\there", "line\nbreak", "\r", "\x7f\x85", "<i>"]
    examples = [LatentExamples(3, 0.1, 2.0, [Example(0, 1, tokens, [0.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0], 1, 2.0)],
                               Dashboard(promoted=[TokenEffect("\x00nul", 5, 1.0)],
                                         suppressed=[TokenEffect("bell\x07", 6, -1.0)]))]
    path = tmp_path / "report.html"
    path.write_text(render_html(report, {}, examples), encoding="utf-8")
    raw = path.read_bytes()
    assert b"\x00" not in raw
    text = raw.decode("utf-8")
    assert not [c for c in text if (ord(c) < 32 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0]
    for shown in (">a\u2400b<", ">\u241b[31m<", ">tab\there<", ">line\u21b5break<", ">\u240d<", ">\u2421\\x85<",
                  ">&lt;i&gt;<", ">\u2400nul<", ">bell\u2407<"):
        assert shown in text, shown
