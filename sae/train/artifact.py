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
from torch import Tensor

from sae.buffer.atomic import naming_the_file, write_json_atomic
from sae.models import SAEConfig, SparseCoder, build_sae
from sae.models.weights import check_finite, check_shapes

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


def save_weights(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` as safetensors, atomically (temporary sibling, then rename).

    safetensors writes through a private temporary file of its own, mode 600 whatever the umask; the
    file here gets the mode a plainly created file would (0o666 less the umask), as cfg.json does,
    so others on a shared cluster read the weights when they may read the folder.

    Raises:
        OSError: as the OS raised it; a full disk names ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with naming_the_file(path):
        tmp.unlink(missing_ok=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
            mode = os.fstat(fd).st_mode & 0o777
            os.close(fd)
            save_file(tensors, str(tmp), metadata=metadata)
            os.chmod(tmp, mode)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
    return path


def save_sae(sae: SparseCoder, directory: str | Path, **extra: Any) -> Path:
    """Write weights and cfg.json into ``directory`` (created). Extra keys go into cfg.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}, directory / WEIGHTS)
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
    cfg_path, weights = directory / CFG, directory / WEIGHTS
    for key in ("d_in", "d_out", "num_latents"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] <= 0:
            raise ValueError(f"{cfg_path}: {key} is {meta.get(key)!r}, not a positive integer; the folder is damaged: "
                             "restore it or export it again")
    cfg = SAEConfig(**meta["sae"])
    # Sizes come from cfg.json; the weight file's header must agree before anything is allocated.
    with torch.device("meta"):
        probe = build_sae(cfg, meta["d_in"], meta["d_out"])
    if probe.num_latents != meta["num_latents"]:
        raise ValueError(f"{cfg_path}: num_latents is {meta['num_latents']} but its 'sae' section makes an SAE with "
                         f"{probe.num_latents}; the file was edited: restore it or export it again")
    check_shapes(weights, {k: tuple(v.shape) for k, v in probe.state_dict().items()},
                 f"{cfg_path} (d_in={meta['d_in']}, d_out={meta['d_out']}, num_latents={meta['num_latents']})")
    state = load_file(str(weights), device="cpu")  # one copy on the device, made by .to()
    check_finite(state, weights)
    sae = build_sae(cfg, meta["d_in"], meta["d_out"])
    sae.load_state_dict(state, strict=True)
    return sae.to(device)
