"""The outputs of ``sae-eval``: ``report.json`` (everything, machine-readable) and ``report.html``.

The HTML is one static file that opens offline: a summary table, the spliced-model table, the
plots embedded as base64 PNG (the PNG files sit next to it as well), and a dashboard for each
sampled latent: its activation histogram (inline SVG), the tokens its decoder direction promotes
and suppresses (causal LMs), its nearest decoder neighbours, and its top-activating contexts with
each token shaded by the latent's activation. A small inline script counts images that failed to
decode and shows a warning banner if any did; it also marks ``<body>`` with
``data-images-ok="<loaded>/<total>"`` and the page boxes (x,y,w,h) of every image, table and
latent dashboard panel, which the headless-browser check (:mod:`sae.eval.screenshot`) reads.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

from .dashboards import Dashboard, Histogram
from .examples import LatentExamples

REPORT_FILES = frozenset({"report.json", "report.html", "latents.safetensors", "density.png", "l0.png",
                          "freq_vs_norm.png", "training.png", "report.md", "graphs"})
"""Every file ``sae-eval`` writes; a report folder holds nothing else."""
PACKAGES = ("sae-forge", "torch", "transformers", "safetensors", "numpy", "matplotlib", "hydra-core")

SUMMARY_ROWS = [
    ("fvu", "FVU (fraction of variance unexplained)", "{:.4f}"),
    ("explained_variance", "explained variance", "{:.4f}"),
    ("mse", "MSE", "{:.4g}"),
    ("cosine", "cosine similarity", "{:.4f}"),
    ("relative_norm", "relative norm ||x̂|| / ||x||", "{:.4f}"),
    ("relative_reconstruction_bias", "relative reconstruction bias E||x̂||² / E⟨x, x̂⟩", "{:.4f}"),
    ("l0", "L0 (mean active latents per token)", "{:.2f}"),
    ("l0_p50", "L0 median", "{:.0f}"),
    ("l0_p90", "L0 90th percentile", "{:.0f}"),
    ("l1", "L1 (mean sum of activations)", "{:.4g}"),
    ("dead_fraction", "dead latents (never fired on the eval set)", "{:.2%}"),
    ("dead_fraction_window", "dead latents (silent for the window)", "{:.2%}"),
    ("dense_fraction", "dense latents (fire on > threshold of tokens)", "{:.2%}"),
    ("encoder_mean_max_cosine", "mean max cosine between encoder rows", "{:.4f}"),
    ("decoder_mean_max_cosine", "mean max cosine between decoder rows", "{:.4f}"),
    ("tokens", "eval tokens", "{:,.0f}"),
]
SPLICE_ROWS = [
    ("ce_loss_recovered", "CE loss recovered (vs zero ablation)", "{:.4f}"),
    ("ce_loss_recovered_mean", "CE loss recovered (vs mean ablation)", "{:.4f}"),
    ("ce_loss_clean", "CE loss, clean", "{:.4f}"),
    ("ce_loss_sae", "CE loss, with SAE", "{:.4f}"),
    ("ce_loss_zero", "CE loss, zero ablation", "{:.4f}"),
    ("ce_loss_mean", "CE loss, mean ablation", "{:.4f}"),
    ("kl_div_sae", "KL(clean || SAE), next-token", "{:.4g}"),
    ("kl_div_zero", "KL(clean || zero ablation)", "{:.4g}"),
    ("kl_div_score", "KL score (KL_zero - KL_SAE) / KL_zero", "{:.4f}"),
    ("pooled_cosine_sae", "sentence embedding cosine, SAE vs clean", "{:.4f}"),
    ("pooled_cosine_zero", "sentence embedding cosine, zero ablation", "{:.4f}"),
    ("pooled_cosine_mean", "sentence embedding cosine, mean ablation", "{:.4f}"),
    ("hidden_fvu_sae", "last hidden state FVU, SAE", "{:.4f}"),
    ("hidden_fvu_zero", "last hidden state FVU, zero ablation", "{:.4f}"),
    ("hidden_cosine_sae", "last hidden state cosine, SAE", "{:.4f}"),
    ("hidden_fvu_recovered", "last hidden state FVU recovered (vs zero)", "{:.4f}"),
    ("tokens", "scored positions", "{:,.0f}"),
]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:13px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 10px;font-size:14px;text-align:left}td.v{text-align:right;font-family:monospace}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{margin:0}
.plots img{max-width:540px;border:1px solid #eee}.plots img.wide{max-width:1100px}
.latent{margin:14px 0}.ex{font-family:monospace;font-size:13px;white-space:pre-wrap;margin:2px 0;padding:2px 4px;
background:#fafafa;border-left:3px solid #ddd}.ex .val{color:#888;display:inline-block;width:64px}
.dash{display:flex;flex-wrap:wrap;gap:18px;margin:4px 0 6px 0}.panel{font-size:13px;max-width:300px}
.panel .meta{font-size:12px}.chip{display:inline-block;font-family:monospace;font-size:12px;padding:1px 4px;margin:1px;
border-radius:3px}.up{background:#d6f0d6}.down{background:#f6d6d6}svg.hist rect{fill:#e08a2c}
svg.hist text{font-size:10px;fill:#666}.tok{border-radius:2px}.focus{outline:1px solid #c05000}
#broken{display:none;background:#fdd;padding:8px;border:1px solid #c00;color:#900}
"""
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var box = function (e) {
    var r = e.getBoundingClientRect();
    return [r.left, r.top + window.scrollY, r.width, r.height].map(Math.round).join(',');
  };
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
  document.body.setAttribute('data-image-boxes', imgs.map(box).join(';'));
  document.body.setAttribute('data-table-boxes', Array.prototype.map.call(document.querySelectorAll('table'), box)
    .join(';'));
  document.body.setAttribute('data-page-height', document.documentElement.scrollHeight);
  document.body.setAttribute('data-panel-boxes', Array.prototype.map.call(document.querySelectorAll('.panel'), box)
    .join(';'));
  if (ok < imgs.length) {
    var b = document.getElementById('broken');
    b.textContent = (imgs.length - ok) + ' plot(s) failed to load';
    b.style.display = 'block';
  }
});
"""


# Control characters made visible (C0 as the Unicode control pictures, NUL -> U+2400; DEL; C1 as
# \x80..\x9f), tab and newline kept: token strings carry raw bytes, and a control character in an
# HTML page is a parse error that browsers and tools handle differently.
_CONTROLS = {**{c: chr(0x2400 + c) for c in range(32) if c not in (9, 10)}, 0x7F: "\u2421",
             **{c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}}


def escape(text: str) -> str:
    """``html.escape`` with every control character but tab and newline shown as a visible escape."""
    return html.escape(text).translate(_CONTROLS)


def check_report_dir(out: Path) -> None:
    """Refuse an output folder that is a file or holds anything but an earlier report: the report
    folder is replaced as a whole (:func:`sae.paths.replacing_dir`), never over a user's files.

    Raises:
        ValueError: naming the folder, a file in it no report writes, and the fix.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"the report folder {str(out)!r} is a file; set eval.out_dir to a new or empty folder")
    other = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES) if out.is_dir() else []
    if other:
        more = f" and {len(other) - 1} more" if other[1:] else ""
        raise ValueError(f"the report folder {str(out)!r} holds {other[0]!r}{more}, which no report writes; the "
                         "folder is replaced whole, so set eval.out_dir to a new or empty folder (or move those files)")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _table(rows: list[tuple[str, str, str]], values: dict[str, Any]) -> str:
    cells = []
    for key, label, fmt in rows:
        v = values.get(key)
        if isinstance(v, (int, float)):
            cells.append(f"<tr><td>{escape(label)}</td><td class='v'>{escape(fmt.format(v))}</td>"
                         f"<td class='meta'>{key}</td></tr>")
    return "<table>" + "".join(cells) + "</table>"


def _clt_table(clt: dict[str, Any]) -> str:
    """Per output layer: the FVU, MSE and cosine of its reconstruction, and its latent group's L0 and dead share."""
    head = "".join(f"<th>{h}</th>" for h in ("layer", "MLP input → output", "FVU", "MSE", "cosine", "L0 of its latents",
                                             "dead latents"))
    rows = []
    for r in clt["layers"]:
        cells = [escape(str(r["layer"])), escape(f"{r['input']} → {r['target']}")]
        cells += [f"{r['fvu']:.4f}", f"{r['mse']:.4g}", f"{r['cosine']:.4f}", f"{r['l0']:.2f}",
                  f"{r['dead_fraction']:.2%}"]
        rows.append("<tr>" + "".join(f"<td class='v'>{c}</td>" if i > 1 else f"<td>{c}</td>"
                                     for i, c in enumerate(cells)) + "</tr>")
    kind = "acausal crosscoder" if clt["acausal"] else "cross-layer transcoder"
    note = (f"<div class='meta'>{kind}, {escape(str(clt['activation']))}, {clt['latents_per_layer']} latents per "
            f"layer; sum of per-layer FVUs (the training loss) {clt['fvu_sum']:.4f}</div>")
    return note + "<table><tr>" + head + "</tr>" + "".join(rows) + "</table>"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    wide = " class='wide'" if path.stem == "training" else ""
    return (f"<figure><img{wide} alt='{escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption class='meta'>{escape(caption)} ({escape(path.name)})</figcaption></figure>")


def _token_span(tok: str, act: float, peak: float, focus: bool) -> str:
    alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, act / peak))
    text = escape(tok.replace("\n", "↵"))
    title = f" title='{act:.3g}'" if act > 0 else ""
    cls = "tok focus" if focus else "tok"
    return f"<span class='{cls}' style='background:rgba(255,140,0,{alpha:.2f})'{title}>{text}</span>"


def _histogram_svg(h: Histogram, width: int = 240, height: int = 64) -> str:
    peak = max(h.counts) or 1
    bar_w = width / len(h.counts)
    bars = []
    for i, c in enumerate(h.counts):
        bh = (height - 14) * c / peak
        lo, hi = h.edges[i], h.edges[i + 1]
        bars.append(f"<rect x='{i * bar_w:.1f}' y='{height - 14 - bh:.1f}' width='{max(bar_w - 1, 1):.1f}' "
                    f"height='{bh:.1f}'><title>{lo:.3g} to {hi:.3g}: {c}</title></rect>")
    return (f"<svg class='hist' width='{width}' height='{height}' role='img'>" + "".join(bars)
            + f"<text x='0' y='{height - 2}'>{h.edges[0]:.3g}</text>"
            + f"<text x='{width}' y='{height - 2}' text-anchor='end'>{h.edges[-1]:.3g}</text></svg>")


def _chips(effects: list, cls: str) -> str:
    return "".join(f"<span class='chip {cls}' title='{e.value:+.3g} (token {e.token_id})'>"
                   f"{escape(e.token.replace(chr(10), '↵'))}</span>" for e in effects)


def _dashboard_html(d: Dashboard, shown: set[int], tokens_note: str) -> str:
    panels = []
    if d.histogram is not None:
        n = sum(d.histogram.counts)
        panels.append(f"<div class='panel'><div class='meta'>activations when firing ({n:,} tokens)</div>"
                      f"{_histogram_svg(d.histogram)}</div>")
    if d.promoted or d.suppressed:
        panels.append(f"<div class='panel'><div class='meta'>promotes (W_U · decoder)</div>{_chips(d.promoted, 'up')}"
                      f"<div class='meta'>suppresses</div>{_chips(d.suppressed, 'down')}</div>")
    elif tokens_note:
        panels.append(f"<div class='panel'><div class='meta'>promoted tokens: {escape(tokens_note)}</div></div>")
    if d.neighbours:
        items = []
        for nb in d.neighbours:
            name = f"<a href='#latent-{nb.latent}'>{nb.latent}</a>" if nb.latent in shown else str(nb.latent)
            items.append(f"<div>{name} <span class='meta'>cos {nb.cosine:.3f}</span></div>")
        panels.append("<div class='panel'><div class='meta'>nearest decoder neighbours</div>" + "".join(items)
                      + "</div>")
    return "<div class='dash'>" + "".join(panels) + "</div>" if panels else ""


def _examples_html(latents: list[LatentExamples], tokens_note: str = "") -> str:
    parts = []
    shown = {le.latent for le in latents}
    for le in latents:
        parts.append(f"<div class='latent' id='latent-{le.latent}'><b>latent {le.latent}</b> <span class='meta'>"
                     f"frequency {le.frequency:.3g}, max activation {le.max_activation:.3g}</span>")
        parts.append(_dashboard_html(le.dashboard, shown, tokens_note))
        for ex in le.examples:
            toks = "".join(_token_span(t, a, le.max_activation, i == ex.focus)
                           for i, (t, a) in enumerate(zip(ex.tokens, ex.acts)))
            parts.append(f"<div class='ex'><span class='val'>{ex.value:.3g}</span>{toks}</div>")
        parts.append("</div>")
    return "".join(parts)


def render_html(report: dict[str, Any], plots: dict[str, Path], examples: list[LatentExamples]) -> str:
    """The report page as one HTML string (plots inlined)."""
    s = report["sae"]
    title = f"SAE evaluation: {s['name']} ({s['architecture']}, {s['num_latents']} latents) at {s['hookpoint']}"
    body = [f"<h1>{escape(title)}</h1>",
            f"<div class='meta'>{escape(str(s['path']))} · data: {escape(report['data']['source'])} · "
            f"created {escape(report['created'])}</div>", "<div id='broken'></div>",
            "<h2>Summary</h2>", _table(SUMMARY_ROWS, report["metrics"])]
    if report.get("clt"):
        body += ["<h2>Per layer</h2>", _clt_table(report["clt"])]
    splice = report.get("splice") or {}
    body.append("<h2>Spliced model</h2>")
    if splice.get("metrics"):
        what = ("the SAE's reconstruction replaces the hook point at kept positions" if not report.get("clt") else
                "the CLT's reconstruction replaces every layer's MLP output at kept positions, its codes from the MLP "
                + ("inputs of the spliced forward (replacement model)" if splice.get("inputs") == "replacement"
                   else "inputs of the clean forward"))
        body.append(f"<div class='meta'>{escape(splice['kind'])}, model {escape(splice['model'])}; "
                    f"{what}</div>")
        body.append(_table(SPLICE_ROWS, splice["metrics"]))
    else:
        body.append(f"<p class='meta'>not run: {escape(splice.get('skipped', 'no model'))}</p>")
    if plots:
        body.append("<h2>Plots</h2><div class='plots'>")
        body += [_img(p, name) for name, p in plots.items()]
        body.append("</div>")
    body.append("<h2>Latent dashboards</h2>")
    if examples:
        body.append("<p class='meta'>Sampled latents across the frequency range. For each: the histogram of its "
                    "non-zero activations on the eval rows; the tokens its decoder direction promotes and suppresses "
                    "on the direct path through the unembedding (causal LMs; hover for the logit change per unit "
                    "activation); its nearest latents by decoder cosine; then its top-activating contexts, one per "
                    "line, the outlined token where it fires most, shading the activation.</p>")
        body.append(_examples_html(examples, report.get("logit_tokens_skipped", "")))
    else:
        body.append(f"<p class='meta'>none: {escape(report.get('examples_skipped', 'no token ids'))}</p>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + escape(title) + "</title><style>"
            + _CSS + "</style><script>" + _SCRIPT + "</script></head><body>" + "".join(body) + "</body></html>")


def examples_json(examples: list[LatentExamples]) -> list[dict[str, Any]]:
    return [{"latent": le.latent, "frequency": le.frequency, "max_activation": le.max_activation,
             "examples": [vars(ex) for ex in le.examples], **dataclasses.asdict(le.dashboard)} for le in examples]
