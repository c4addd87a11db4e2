"""The portable SAE artefact: ``<dir>/sae.safetensors`` + ``<dir>/cfg.json`` per hook point.

This is what evaluation and export read; it holds no training state. Weights load through
safetensors only (no pickle).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae.buffer.atomic import naming_the_file, write_json_atomic
from sae.models import SAEConfig, SparseCoder, build_sae

WEIGHTS = "sae.safetensors"
CFG = "cfg.json"


def sae_metadata(sae: SparseCoder, **extra: Any) -> dict[str, Any]:
    return {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_out": sae.d_out,
        "num_latents": sae.num_latents,
        "sae": dataclasses.asdict(sae.cfg),
        **extra,
    }


def save_sae(sae: SparseCoder, directory: str | Path, **extra: Any) -> Path:
    """Write weights and cfg.json into ``directory`` (created). Extra keys go into cfg.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    tmp = directory / f".{WEIGHTS}.tmp-{os.getpid()}"
    with naming_the_file(directory / WEIGHTS):
        try:
            save_file(tensors, str(tmp))
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, directory / WEIGHTS)
    write_json_atomic(directory / CFG, sae_metadata(sae, **extra))
    return directory


def read_sae_cfg(directory: str | Path) -> dict[str, Any]:
    """The folder's cfg.json, read as plain data (nothing in it is resolved or run).

    Raises:
        FileNotFoundError: no cfg.json. ValueError: not valid JSON, or another library's format.
    """
    path = Path(directory) / CFG
    if not path.is_file():
        raise FileNotFoundError(f"no {CFG} in {directory}: not an SAE folder written by save_sae")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the SAE folder is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sae"), dict) or "architecture" not in meta:
        other = "SAELens" if (Path(directory) / "sae_weights.safetensors").is_file() else "SAELens or sparsify"
        raise ValueError(f"{directory} is not in this project's SAE format (its {CFG} has no 'sae' section: a {other} "
                         f"folder?); convert it with `sae-export {directory} OUT --format ours`, then use "
                         "OUT/<hookpoint>")
    return meta


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> SparseCoder:
    """Load an SAE written by :func:`save_sae`.

    Raises:
        FileNotFoundError: missing files. ValueError: unknown config keys or shape mismatch.
    """
    directory = Path(directory)
    meta = read_sae_cfg(directory)
    fields = {f.name for f in dataclasses.fields(SAEConfig)}
    unknown = set(meta["sae"]) - fields
    if unknown:
        raise ValueError(f"{directory / CFG}: unknown SAE config keys {sorted(unknown)}")
    sae = build_sae(SAEConfig(**meta["sae"]), meta["d_in"], meta["d_out"])
    state = load_file(str(directory / WEIGHTS), device="cpu")  # one copy on the device, made by .to()
    sae.load_state_dict(state, strict=True)
    return sae.to(device)
