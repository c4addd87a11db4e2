"""The model side of evaluation: load the model with its head, and run an SAE on raw activations.

Reuses the harvest stage (``resolve_model_path``, ``load_model``, the Harvester's row rules);
adds what harvesting never needs: the LM head of causal models (for CE loss and KL), the
choice between causal-LM and encoder scoring, and the SAE as a map from raw activations to raw
reconstructions through the normalisation it was trained with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sae.buffer.normalize import Normalizer
from sae.harvest.config import ModelConfig
from sae.harvest.hookpoints import FAMILIES
from sae.harvest.model import (
    TORCH_DTYPES,
    LoadedModel,
    _transformers_version,
    load_model,
    resolve_device,
    resolve_model_path,
)
from sae.models import SparseCoder

_ENCODER_TYPES = {t for t, fam in FAMILIES.items() if fam is FAMILIES["bert"]}


def detect_kind(hf_config: Any) -> str:
    """``causal_lm`` or ``encoder`` from a transformers config (architectures, then model_type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(hf_config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal_lm"
    if archs or getattr(hf_config, "model_type", "") in _ENCODER_TYPES:
        return "encoder"
    return "causal_lm" if getattr(hf_config, "model_type", "") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"


def load_eval_model(cfg: ModelConfig, kind: str = "auto") -> tuple[LoadedModel, str]:
    """The model for spliced evaluation and its kind: causal LMs with their LM head, encoders as
    base models (what ``load_model`` gives).

    Raises:
        ValueError: the model cannot load (message from the harvest stage), or a causal LM
            without a head class.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.name, cfg.revision)
    kw: dict[str, Any] = {"revision": cfg.revision or None, "trust_remote_code": cfg.trust_remote_code}
    try:
        hf_config = AutoConfig.from_pretrained(path, **kw)
    except OSError as e:
        raise ValueError(f"could not read the config of model.name={cfg.name!r} ({path!r}): {e}. Offline, use a "
                         "local folder or the packaged model") from e
    kind = detect_kind(hf_config) if kind == "auto" else kind
    if kind == "encoder":
        return load_model(cfg), kind
    device = resolve_device(cfg.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        dtype_kw = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"  # as the harvester's loader
        model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, **{dtype_kw: TORCH_DTYPES[cfg.dtype]},
                                                     **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load model.name={cfg.name!r} ({path!r}) as a causal LM: {e}. Use "
                         "eval.splice.kind=encoder, or eval.splice.enabled=false") from e
    model.eval().requires_grad_(False).to(device)
    info = {"name": cfg.name, "path": path, "revision": cfg.revision, "class": type(model).__name__,
            "model_type": getattr(hf_config, "model_type", ""), "dtype": cfg.dtype}
    return LoadedModel(model, tokenizer, device, info), kind


def normalizer_from_dict(d: dict[str, Any] | None) -> Normalizer:
    """Inverse of ``Normalizer.as_dict`` (what the SAE's cfg.json records)."""
    if not d:
        return Normalizer("none")
    mean = d.get("mean")
    return Normalizer(d["mode"], float(d.get("scale", 1.0)), None if mean is None else torch.tensor(mean))


def denormalize(norm: Normalizer, y: Tensor) -> Tensor:
    """Map normalised rows back to the model's scale: y / scale + mean."""
    if norm.mode == "none":
        return y
    y = y / norm.scale
    return y + norm.mean.to(y.device) if norm.mean is not None else y


class SAEReconstructor:
    """Raw input rows [N, D] -> raw reconstructions [N, E]: normalise, encode, decode, map back."""

    def __init__(self, sae: SparseCoder, x_norm: Normalizer, y_norm: Normalizer, chunk: int = 8192):
        self.sae, self.x_norm, self.y_norm, self.chunk = sae, x_norm, y_norm, chunk

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        p = next(self.sae.parameters())
        outs = []
        for a in range(0, x.shape[0], self.chunk):
            xb = self.x_norm(x[a:a + self.chunk].to(p.device, torch.float32).clone())
            outs.append(denormalize(self.y_norm, self.sae.reconstruct(xb, self.sae.encode(xb))))
        return torch.cat(outs) if outs else x.new_zeros(0, self.sae.d_out)
