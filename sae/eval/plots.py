"""PNG plots of an evaluation (matplotlib's Agg canvas; no pyplot, no display, no global state).

    density.png         log10 feature-density histogram, dead latents counted apart
    l0.png              distribution of L0 (active latents per token)
    freq_vs_norm.png    per-latent firing frequency against decoder-row norm
    training.png        training curves from the run's metrics.jsonl (when present)
Each function writes one file and returns its path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from .metrics import DensityHistogram

DPI = 100


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def plot_density(hist: DensityHistogram, path: str | Path, title: str = "") -> Path:
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    widths = [b - a for a, b in zip(hist.edges, hist.edges[1:])]
    ax.bar(hist.edges[:-1], hist.counts, width=widths, align="edge", color="#3b6ea8", edgecolor="white")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(title or "Feature density")
    total = sum(hist.counts) + hist.dead
    ax.text(0.02, 0.95, f"dead (never fired): {hist.dead} / {total}", transform=ax.transAxes, va="top",
            color="#a83b3b", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    return _save(fig, Path(path))


def plot_l0(l0_counts: Tensor, path: str | Path, mean: float) -> Path:
    counts = l0_counts.double()
    nz = counts.nonzero().flatten()
    top = int(nz.max()) + 1 if nz.numel() else 1
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    ax.bar(range(top), (counts[:top] / counts.sum().clamp_min(1)).tolist(), width=1.0, color="#3b8a5a")
    ax.axvline(mean, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(f"L0 distribution (mean {mean:.1f})")
    return _save(fig, Path(path))


def plot_freq_vs_norm(frequencies: Tensor, decoder_norms: Tensor, path: str | Path, n_tokens: int) -> Path:
    f = frequencies.double().cpu()
    floor = 0.5 / max(n_tokens, 1)  # dead latents drawn at half the smallest observable frequency
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    alive = f > 0
    ax.scatter(f[alive].tolist(), decoder_norms.cpu()[alive].tolist(), s=4, alpha=0.5, color="#3b6ea8",
               label="fired")
    if (~alive).any():
        ax.scatter([floor] * int((~alive).sum()), decoder_norms.cpu()[~alive].tolist(), s=6, color="#a83b3b",
                   marker="x", label="dead")
    ax.set_xscale("log")
    ax.set_ylim(0, max(float(decoder_norms.max()), 1e-12) * 1.15)  # unit-norm decoders: no offset axis
    ax.set_xlabel("firing frequency")
    ax.set_ylabel("decoder row norm")
    ax.set_title("Frequency vs decoder norm")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, Path(path))


def read_curves(metrics_jsonl: Path, name: str) -> dict[str, list[tuple[int, float]]]:
    """Series ``key -> [(step, value)]`` of this SAE's train/ and eval/ metrics in a metrics.jsonl."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in metrics_jsonl.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        for k, v in row.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[2] == name and isinstance(v, (int, float)) and math.isfinite(v):
                curves.setdefault(f"{parts[0]}/{parts[1]}", []).append((int(row["step"]), float(v)))
    return curves


def plot_training(curves: dict[str, list[tuple[int, float]]], path: str | Path) -> Path | None:
    """FVU, L0 and dead fraction over steps (train and eval series); None when nothing to draw."""
    panels = [("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction")]
    panels = [(k, t) for k, t in panels if any(key.endswith("/" + k) for key in curves)]
    if not panels:
        return None
    fig = Figure(figsize=(4 * len(panels), 3.4))
    for i, (k, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for split, style, label in (("train", "-", "train"), ("eval", "o-", "held-out")):
            pts = curves.get(f"{split}/{k}")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, markersize=3, label=label)
        if k == "fvu" and all(v > 0 for s in ("train", "eval") for _, v in curves.get(f"{s}/fvu", [])):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


def decoder_norms(W_dec_LE: Tensor) -> Tensor:
    return W_dec_LE.detach().float().norm(dim=1).cpu()
