"""Import: load a published SAE (a local folder or a Hugging Face Hub repo) into our classes.

    from sae.export import load_pretrained
    sae = load_pretrained("runs/x/export/layers.3")                      # any supported format
    sae = load_pretrained("EleutherAI/sae-pythia-70m-32k", hookpoint="layers.3")   # Hub repo id

The format is detected from the files (:func:`detect_format`): ours (``sae.safetensors`` +
``cfg.json`` with an ``sae`` section), SAELens (``sae_weights.safetensors``), sparsify
(``sae.safetensors`` with ``encoder.weight``) or circuit-tracer (``config.yaml`` with
``layer_{i}.safetensors`` or ``W_enc_{i}``/``W_dec_{i}.safetensors``; ``hookpoint`` then picks one
transcoder of a per-layer set, e.g. ``layers.3.mlp_in``). The result is a :class:`~sae.models.SparseCoder`
whose ``encode``/``decode``/``forward`` match the source library's outputs, so it can be
evaluated or trained further. Weights are read with safetensors only, never unpickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from sae.models import SparseCoder
from sae.models.weights import check_finite

from . import circuit_tracer, native, saelens, sparsify
from .fold import fold_normalization, is_identity

FORMATS = ("ours", "saelens", "sparsify", "circuit-tracer")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Pretrained:
    """An imported SAE and what its folder says about it."""

    sae: SparseCoder
    format: str
    """ours | saelens | sparsify | circuit-tracer"""
    folder: Path
    name: str = ""
    hookpoint: str = ""
    target_hookpoint: str = ""
    model_name: str = ""
    cfg: dict[str, Any] = field(default_factory=dict)
    """The folder's cfg.json (circuit-tracer: config.yaml) as written."""
    folded: bool = False
    """Whether the training normalisation recorded in an ``ours`` cfg.json was folded into the weights."""


def detect_format(folder: str | Path) -> str:
    """``ours``, ``saelens``, ``sparsify`` or ``circuit-tracer`` from the files in ``folder``.

    Raises:
        FileNotFoundError: no SAE files in ``folder`` (the message lists SAE sub-folders if any).
    """
    folder = Path(folder)
    if (folder / saelens.WEIGHTS).is_file() and (folder / saelens.CFG).is_file():
        return "saelens"
    if (folder / native.FILES[0]).is_file() and (folder / native.FILES[1]).is_file():
        cfg = json.loads((folder / native.FILES[1]).read_text())
        if isinstance(cfg.get("sae"), dict) and "architecture" in cfg:
            return "ours"
        with safe_open(str(folder / sparsify.WEIGHTS), framework="pt") as fh:
            keys = set(fh.keys())
        if "encoder.weight" in keys:
            return "sparsify"
        raise ValueError(f"{folder} has {native.FILES[0]} with tensors {sorted(keys)}: neither our format nor "
                         "sparsify's")
    if circuit_tracer.read_config(folder) is not None:
        return "circuit-tracer"
    subs = sae_subfolders(folder)
    hint = f"; it holds SAEs in {', '.join(subs)}: pass hookpoint=<one of them>" if subs else ""
    raise FileNotFoundError(f"no SAE in {folder} (expected cfg.json with sae.safetensors or "
                            f"sae_weights.safetensors, or circuit-tracer's config.yaml){hint}")


def sae_subfolders(root: Path) -> list[str]:
    """Relative paths of the folders under ``root`` (two levels deep) that hold an SAE."""
    if not root.is_dir():
        return []
    found = {p.parent for name in (saelens.WEIGHTS, sparsify.WEIGHTS) for p in root.glob(f"*/{name}")}
    found |= {p.parent for name in (saelens.WEIGHTS, sparsify.WEIGHTS) for p in root.glob(f"*/*/{name}")}
    return sorted(str(p.relative_to(root)) for p in found if (p / "cfg.json").is_file())


def read_folder(folder: str | Path, layer: str | None = None) -> Pretrained:
    """Load the SAE in ``folder`` in whichever supported format it is.

    Args:
        layer: the transcoder to take from a circuit-tracer set (its input hook point or ``layer_N``).
    """
    folder = Path(folder)
    fmt = detect_format(folder)
    if fmt == "circuit-tracer":
        got = circuit_tracer.read_circuit_tracer(folder, layer)
        return Pretrained(got.sae, fmt, folder, got.name, got.hookpoint, got.target_hookpoint, got.model_name, got.cfg)
    if fmt == "ours":
        sae, cfg = native.read_native(folder)
        prov = cfg.get("provenance") or {}
        data = cfg.get("data") or {}
        return Pretrained(sae, fmt, folder, prov.get("name", folder.name),
                          prov.get("hookpoint") or data.get("hookpoint", ""),
                          prov.get("target_hookpoint") or data.get("target_hookpoint", ""), prov.get("model", ""), cfg)
    if fmt == "saelens":
        sae, cfg = saelens.read_saelens(folder)
        meta = cfg.get("metadata") or {}
        return Pretrained(sae, fmt, folder, folder.name, meta.get("hf_hook_name") or meta.get("hook_name") or "",
                          meta.get("hf_hook_name_out") or meta.get("hook_name_out") or "",
                          meta.get("model_name") or "", cfg)
    sae, cfg = sparsify.read_sparsify(folder)
    return Pretrained(sae, fmt, folder, folder.name, folder.name, "", "", cfg)


def _resolve(path_or_repo: str | Path, hookpoint: str | None, revision: str | None) -> tuple[Path, str | None]:
    """(folder holding the SAE, the transcoder to take from it when it is a circuit-tracer set)."""
    p = Path(path_or_repo)
    if not p.exists():
        if not _REPO_ID.fullmatch(str(path_or_repo)):
            raise FileNotFoundError(f"{path_or_repo} does not exist, and is not a Hub repo id (owner/name)")
        from .hub import download

        p = download(str(path_or_repo), hookpoint, revision=revision)
        if hookpoint and not (p / hookpoint).is_dir():  # a circuit-tracer repo: no folder per hook point
            p = circuit_tracer.download(str(path_or_repo), hookpoint, revision=revision) or p
    if circuit_tracer.read_config(p) is not None:  # one folder for all its transcoders
        return p, hookpoint
    folder = p / hookpoint if hookpoint else p
    if hookpoint and not folder.is_dir():
        subs = sae_subfolders(p)
        raise FileNotFoundError(f"hookpoint={hookpoint!r} is not a folder of {path_or_repo}; it holds "
                                f"{', '.join(subs) or 'no SAE'}")
    if not hookpoint and not (folder / "cfg.json").is_file():
        subs = sae_subfolders(folder)
        if len(subs) == 1:
            return folder / subs[0], None
        if subs:
            raise ValueError(f"{path_or_repo} holds {len(subs)} SAEs ({', '.join(subs[:8])}); choose one with "
                             "hookpoint=")
    return folder, None


def load_pretrained_with_info(path_or_repo: str | Path, hookpoint: str | None = None, *,
                              revision: str | None = None, device: str = "cpu",
                              raw_activations: bool = True) -> Pretrained:
    """Like :func:`load_pretrained`, returning the format and provenance too."""
    loaded = read_folder(*_resolve(path_or_repo, hookpoint, revision))
    check_finite(loaded.sae.state_dict(), f"{loaded.folder} ({loaded.format} format)")
    norm = loaded.cfg.get("normalization") if loaded.format == "ours" else None
    if raw_activations and not is_identity(norm):
        loaded.sae, loaded.folded = fold_normalization(loaded.sae, norm), True
    loaded.sae = loaded.sae.to(device).eval()  # inference mode, as published; .train() to fine-tune
    return loaded


def load_pretrained(path_or_repo: str | Path, hookpoint: str | None = None, *, revision: str | None = None,
                    device: str = "cpu", raw_activations: bool = True) -> SparseCoder:
    """Load an SAE from a local folder or a Hub repo id, in our, SAELens', sparsify's or circuit-tracer's format.

    Args:
        path_or_repo: a folder holding one SAE (or SAE sub-folders), or a Hub repo id
            (downloaded with ``huggingface_hub.snapshot_download``; honours ``HF_ENDPOINT``,
            ``HF_TOKEN`` and ``HF_HUB_OFFLINE``).
        hookpoint: the sub-folder to load when the folder or repo holds several SAEs
            (``layers.3``, or SAELens' ``sae_id``); for a circuit-tracer set, the transcoder's
            input hook point (``layers.3.mlp_in``) or file stem (``layer_3``).
        revision: Hub branch, tag or commit.
        raw_activations: the SAE works on the model's raw activations, whatever the format. An SAE
            of ours trained on normalised activations (``data.normalize``, recorded in cfg.json)
            gets the normalisation folded into its weights, as SAELens and sparsify exports carry
            it. False: as trained, on normalised inputs (what fine-tuning with the same
            normalisation wants; ``train.init_from`` uses it).

    Raises:
        FileNotFoundError / ValueError: no SAE there, several without ``hookpoint``, or a
        configuration we cannot represent exactly (the message says which and what to do).
    """
    return load_pretrained_with_info(path_or_repo, hookpoint, revision=revision, device=device,
                                     raw_activations=raw_activations).sae
