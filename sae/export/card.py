"""Model cards (``README.md``) for exported SAEs, with the Hub's YAML metadata header.

Each SAE folder gets a card (architecture, model, hook point, sizes, k or threshold, tokens
trained, final metrics, how to load it); the export root gets a card listing the SAEs, which is
what the Hub shows for the repo. The header follows the Hub's model-card metadata
(``library_name``, ``tags``, ``base_model`` when the model is a Hub id; see
https://huggingface.co/docs/hub/model-cards).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .item import ExportItem

LIBRARY = {"ours": "sae-forge", "saelens": "saelens", "sparsify": "sparsify"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


@dataclass
class CardEntry:
    """One exported SAE as a card describes it."""

    item: ExportItem
    folder: str
    """Path of its folder inside the export root (the SAELens ``sae_id``, the sparsify hook point)."""


def _yaml_list(values: Sequence[str]) -> str:
    return "".join(f"- {v}\n" for v in values)


def header(fmt: str, items: Sequence[ExportItem]) -> str:
    """The YAML front matter of a card."""
    archs = sorted({i.sae.architecture for i in items})
    tags = ["sparse-autoencoder", "interpretability", LIBRARY[fmt]] + archs
    if any(i.sae.cfg.transcode for i in items):
        tags.append("transcoder")
    out = f"---\nlibrary_name: {LIBRARY[fmt]}\ntags:\n{_yaml_list(dict.fromkeys(tags))}"
    models = sorted({i.model_name for i in items if i.model_name and _HUB_ID.match(i.model_name)
                     and not i.model_name.startswith((".", "/"))})
    if models:
        out += "base_model:\n" + _yaml_list(models)
    return out + "---\n"


def _load_snippet(fmt: str, repo: str, folder: str) -> str:
    if fmt == "saelens":
        return (f'from sae_lens import SAE\nsae = SAE.from_pretrained("{repo}", "{folder}")   # or '
                f'SAE.load_from_disk("<download>/{folder}")')
    if fmt == "sparsify":
        return f'from sparsify import Sae\nsae = Sae.load_from_hub("{repo}", hookpoint="{folder}")'
    return f'from sae.export import load_pretrained\nsae = load_pretrained("{repo}", hookpoint="{folder}")'


def _metrics_table(item: ExportItem) -> str:
    if not item.metrics:
        return "No evaluation was found next to the checkpoint (run `sae-eval` before exporting to include one).\n"
    rows = "".join(f"| {k} | {v:.4g} |\n" for k, v in item.metrics.items())
    return f"Source: {item.metrics_source}\n\n| metric | value |\n|---|---|\n{rows}"


def sae_card(fmt: str, entry: CardEntry, repo_id: str = "") -> str:
    """The README.md of one exported SAE folder."""
    item, sae = entry.item, entry.item.sae
    repo = repo_id or "<repo id or local export folder>"
    rows = [("architecture", sae.architecture + (" transcoder" if sae.cfg.transcode else "")
             + (" with skip connection" if sae.W_skip is not None else "")),
            ("model", item.model_name or "unknown"),
            ("hook point", item.hookpoint or "unknown"),
            ("d_in", str(sae.d_in)), ("num_latents (d_sae)", str(sae.num_latents)),
            ("sparsity", item.sae.sparsity_rule()),
            ("tokens trained", f"{item.tokens:,}" if item.tokens else "unknown"),
            ("steps", str(item.steps) if item.steps else "unknown")]
    if sae.cfg.transcode:
        rows.insert(3, ("target hook point", item.target_hookpoint or "unknown"))
        rows.insert(5, ("d_out", str(sae.d_out)))
    table = "".join(f"| {k} | {v} |\n" for k, v in rows)
    return (f"{header(fmt, [item])}\n# {item.hookpoint or item.name}: {sae.architecture} SAE\n\n"
            f"A sparse {'transcoder' if sae.cfg.transcode else 'autoencoder'} trained with "
            f"sae-forge, exported in the **{fmt}** format.\n\n"
            f"| | |\n|---|---|\n{table}\n## Final metrics\n\n{_metrics_table(item)}\n"
            f"## How to load\n\n```python\n{_load_snippet(fmt, repo, entry.folder)}\n```\n\n"
            "The weights expect raw model activations at the hook point"
            + (" (the training normalisation is folded in).\n" if fmt != "ours" else
               "; cfg.json records the normalisation used in training (`normalization`).\n"))


def repo_card(fmt: str, entries: Sequence[CardEntry], repo_id: str = "") -> str:
    """The README.md at the export root: one line per SAE and how to load them."""
    def k_of(sae) -> str:
        return str(getattr(sae, "k", "-"))  # the TopK family's and the CLT's

    lines = "".join(
        f"| `{e.folder}` | {e.item.sae.architecture} | {e.item.hookpoint or '-'} | {e.item.sae.d_in} | "
        f"{e.item.sae.num_latents} | {k_of(e.item.sae)} | "
        f"{_fmt_metric(e.item.metrics.get('fvu'))} | {_fmt_metric(e.item.metrics.get('l0'))} |\n" for e in entries)
    first = entries[0].folder if entries else "<folder>"
    return (f"{header(fmt, [e.item for e in entries])}\n# Sparse autoencoders ({fmt} format)\n\n"
            f"| folder | architecture | hook point | d_in | num_latents | k | FVU | L0 |\n"
            f"|---|---|---|---|---|---|---|---|\n{lines}\n"
            f"```python\n{_load_snippet(fmt, repo_id or '<repo id>', first)}\n```\n\n"
            "Each folder has its own README.md with the details.\n")


def _fmt_metric(v: float | None) -> str:
    return "-" if v is None or not torch.isfinite(torch.tensor(v)) else f"{v:.4g}"
