"""The SAELens format (``sae_lens.SAE.load_from_disk`` / ``SAE.from_pretrained(repo, folder)``).

One folder per SAE: ``cfg.json``, ``sae_weights.safetensors`` and optionally
``sparsity.safetensors`` (key ``sparsity``: log10 firing frequency per latent). Read from SAELens
6.54's own loader (``sae_lens.loading.pretrained_sae_loaders.sae_lens_disk_loader``): loading is
strict (no extra tensors), ``dtype`` is required, and a ``metadata.sae_lens_version`` >= 6 keeps
the nested metadata as written.

Conventions mapped here (shapes: D d_in, E d_out, L latents):

====================  ===========================  =========================================
ours                  SAELens                       tensors
====================  ===========================  =========================================
topk                  topk (``k``)                  W_enc [D, L] (= ours.T), b_enc, W_dec [L, E], b_dec
relu                  standard                      same
jumprelu              jumprelu                      + threshold [L] = exp(log_threshold)
batchtopk             jumprelu                      + threshold [L] = the learned scalar threshold
matryoshka_topk       topk                          as topk (the nested loss is training-only)
matryoshka_batchtopk  jumprelu                      as batchtopk (SAELens saves its own so too)
gated                 gated                         W_enc, b_gate (= our b_enc), b_mag, r_mag, W_dec, b_dec
relu/jumprelu/        transcoder, skip_transcoder,  + W_skip [E, D]; ``apply_b_dec_to_input: false``
batchtopk transcoder  jumprelu_(skip_)transcoder
====================  ===========================  =========================================

Our SAEs subtract ``b_dec`` before encoding (``apply_b_dec_to_input: true``); transcoders do not.
Activation normalisation is folded into the weights (:mod:`.fold`) and ``normalize_activations``
is ``none``. Our BatchTopK at inference keeps at most ``batch_topk_cap * k`` latents per token
above its threshold; SAELens' JumpReLU has no such cap, so the two differ only on tokens with more
latents above the threshold than that. SAELens has no TopK transcoder: exporting one is an error.

Import reads SAELens 6.x folders (and the pre-6.0 config keys), including folders written by
``SAE.save_model`` and ``TrainingSAE.save_inference_model``; TopK's
``rescale_acts_by_decoder_norm`` and SAEs with ``apply_b_dec_to_input: false`` are folded into
our convention exactly (up to float rounding). A folder written by this exporter records our
training config in ``metadata.sae_forge``, so a Matryoshka TopK SAE comes back as one (groups
included); SAELens' own ``matryoshka_batchtopk`` training folders (``save_model``) import as our
Matryoshka BatchTopK with groups from ``matryoshka_widths``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

import sae as sae_pkg
from sae.models import SAEConfig, SparseCoder, build_sae, sae_class
from sae.models.weights import check_shapes
from sae.train.artifact import save_weights

from .fold import fold_normalization, is_identity
from .item import ExportItem

WEIGHTS = "sae_weights.safetensors"
CFG = "cfg.json"
SPARSITY = "sparsity.safetensors"
FILES = (WEIGHTS, CFG, SPARSITY)
#: The SAELens release whose loader this format was checked against (tests/export/test_peers.py).
FORMAT_VERSION = "6.54.12"

# SAELens architecture -> (our architecture, transcoder, skip connection)
_IMPORT = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "batchtopk": ("batchtopk", False, False),  # a BatchTopKTrainingSAE saved with save_model
    "matryoshka_batchtopk": ("matryoshka_batchtopk", False, False),  # its training SAE's save_model
    "gated": ("gated", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}


# Families that differ from their base only in the training loss.


def saelens_architecture(sae: SparseCoder) -> str:
    """The SAELens architecture name our ``sae`` exports as.

    Raises:
        ValueError: no SAELens equivalent (TopK and Gated transcoders, cross-layer transcoders).
    """
    arch = sae.export_form
    if sae.cross_layer:
        raise ValueError("SAELens has no cross-layer transcoder; export this one with --format circuit-tracer "
                         "(a causal ReLU/JumpReLU/BatchTopK CLT over layers 0..N-1) or --format ours")
    if arch not in ("topk", "relu", "jumprelu", "batchtopk", "gated"):
        raise ValueError(f"SAELens has no {sae.architecture!r} architecture; export this one with --format ours")
    if arch == "gated" and sae.cfg.transcode:
        raise ValueError("SAELens has no gated transcoder; export this one with --format ours")
    if not sae.cfg.transcode:
        return {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                "gated": "gated"}[arch]
    if arch == "topk":
        raise ValueError("SAELens has no TopK transcoder (its transcoders are ReLU or JumpReLU); export this one "
                         "with --format ours or --format sparsify (same input and output width), or train "
                         "sae=batchtopk, which exports as a JumpReLU transcoder")
    base = "transcoder" if arch == "relu" else "jumprelu_transcoder"
    if sae.W_skip is None:
        return base
    return "skip_transcoder" if arch == "relu" else "jumprelu_skip_transcoder"


def write_saelens(item: ExportItem, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write ``item`` in the SAELens format into ``folder`` (created).

    Raises:
        ValueError: an architecture SAELens cannot represent (the message names the alternative).
    """
    arch = saelens_architecture(item.sae)
    sae = fold_normalization(item.sae, item.meta.get("normalization"))
    tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if arch == "gated":
        tensors = {"W_enc": sae.W_enc.T, "b_gate": sae.b_enc, "b_mag": sae.b_mag, "r_mag": sae.r_mag,
                   "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    thr = sae.jumprelu_thresholds()
    if thr is not None:
        tensors["threshold"] = thr
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": sae.d_in, "d_sae": sae.num_latents, "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if arch == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    if sae.cfg.transcode:
        cfg["d_out"] = sae.d_out
    hook = item.hookpoint or item.name
    metadata: dict[str, Any] = {"sae_lens_version": FORMAT_VERSION, "model_name": item.model_name or None,
                                "hook_name": hook, "hf_hook_name": hook}
    if sae.cfg.transcode:
        metadata.update(hook_name_out=item.target_hookpoint or None, hf_hook_name_out=item.target_hookpoint or None)
    metadata["sae_forge"] = {  # what our import needs to restore the exact training config
        "version": sae_pkg.__version__, "architecture": sae.architecture, "sae": dataclasses.asdict(sae.cfg),
        "act_scale": float(sae.act_scale) if hasattr(sae, "act_scale") else None,
        "normalization_folded": not is_identity(item.meta.get("normalization")),
        "tokens": item.tokens, "steps": item.steps,
    }
    cfg["metadata"] = metadata
    folder.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}, folder / WEIGHTS,
                 metadata={"format": "pt"})
    if item.frequencies is not None:  # SAELens' convention: log10 of the firing frequency (+1e-10)
        save_weights({"sparsity": torch.log10(item.frequencies.float() + 1e-10).contiguous()}, folder / SPARSITY)
    (folder / CFG).write_text(json.dumps(cfg, indent=2))


# --- import ---------------------------------------------------------------------------------
def _version(cfg: dict[str, Any]) -> int:
    v = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version") or "0"
    try:
        return int(str(v).split(".")[0])
    except ValueError:
        return 0


def _upgrade_pre6(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens < 6 configs (``hook_point``, ``activation_fn_str``, TopK via ``activation_fn_kwargs``)."""
    out = dict(cfg)
    out.setdefault("hook_name", cfg.get("hook_point", ""))
    act = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    if act == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
        out["architecture"], out["k"] = "topk", cfg["activation_fn_kwargs"]["k"]
    out.setdefault("architecture", "standard")
    out.setdefault("apply_b_dec_to_input", True)
    norm = cfg.get("normalize_activations")
    out["normalize_activations"] = ("expected_average_only_in" if norm is True else "none") \
        if isinstance(norm, bool) or norm is None else norm
    out["metadata"] = {"hook_name": out["hook_name"], "model_name": cfg.get("model_name")}
    return out


def _unit_rows(W_dec: Tensor) -> bool:
    return bool(((W_dec.norm(dim=1) - 1).abs() < 1e-3).all())


def read_saelens(folder: Path) -> tuple[SparseCoder, dict[str, Any]]:
    """(SAE in our classes, SAELens cfg.json) of a SAELens folder.

    Raises:
        ValueError: an architecture or option we cannot represent exactly (the message says which).
    """
    cfg = json.loads((folder / CFG).read_text())
    if _version(cfg) < 6:
        cfg = _upgrade_pre6(cfg)
    arch = cfg.get("architecture", "standard")
    if arch not in _IMPORT:
        raise ValueError(f"{folder / CFG}: SAELens architecture {arch!r} has no equivalent here; supported: "
                         f"{', '.join(sorted(_IMPORT))}")
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(f"{folder / CFG}: normalize_activations={cfg['normalize_activations']!r}; fold it into the "
                         "weights first (SAELens: sae.fold_activation_norm_scaling_factor(f); sae.save_model(path))")
    ours, transcode, skip = _IMPORT[arch]
    d_in, L = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out", d_in)) if transcode else d_in
    check_shapes(folder / WEIGHTS, {"W_enc": (d_in, L), "W_dec": (L, d_out)},
                 f"{folder / CFG} (d_in={d_in}, d_sae={L}, d_out={d_out})", exact_names=False)
    state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
    scaling = state.pop("scaling_factor", state.pop("finetuning_scaling_factor", None))
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise ValueError(f"{folder / WEIGHTS}: a finetuning scaling factor other than 1 is not supported; fold it "
                         "into W_dec (W_dec * scaling_factor[:, None]) first")
    if ours == "gated":
        state["b_enc"] = state.pop("b_gate")
    W_enc, b_enc, W_dec, b_dec = (state.pop(k) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    W_enc = W_enc.T.contiguous()  # ours: [L, D]
    if sae_class(ours).export_form in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=1).clamp_min(1e-8)  # SAELens' own fold (TopKSAE._fold_norm_topk)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    if not transcode and not cfg.get("apply_b_dec_to_input", True):
        shift = W_enc @ b_dec  # ours encodes x - b_dec: move b_dec into the encoder bias
        b_enc = b_enc + shift
        if ours == "gated":  # the magnitude path reads exp(r_mag) * W_enc x
            state["b_mag"] = state["b_mag"] + state["r_mag"].exp() * shift
    restored = ((cfg.get("metadata") or {}).get("sae_forge") or {})
    fields = {f.name for f in dataclasses.fields(SAEConfig)}
    base = {k: v for k, v in (restored.get("sae") or {}).items() if k in fields}
    if ours == "topk" and restored.get("architecture") == "matryoshka_topk":
        ours = "matryoshka_topk"  # our own export: the training loss comes back with it
    if ours == "matryoshka_batchtopk" and cfg.get("matryoshka_widths"):
        widths = [int(w) for w in cfg["matryoshka_widths"]]
        base["matryoshka_groups"] = [w - p for p, w in zip([0, *widths[:-1]], widths)]
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    k = int(round(float(cfg.get("k", base.get("k", 32)))))
    if ours == "jumprelu":
        thr = state.pop("threshold", None)
        if thr is None and "log_threshold" in state:
            thr = state.pop("log_threshold").exp()
        if thr is None:
            raise ValueError(f"{folder / WEIGHTS}: a {arch} SAE needs a 'threshold' tensor")
        params["log_threshold"] = thr.clamp_min(0).log()  # thresholds <= 0 act as 0 after the ReLU
        params["act_scale"] = torch.tensor(float(restored.get("act_scale") or 1.0))
        k = min(max(k, 1), L - 1)  # our JumpReLU keeps k as its initial L0 target
    elif ours in ("batchtopk", "matryoshka_batchtopk"):
        params["threshold"] = state.pop("topk_threshold").float().reshape(())
        base["batch_topk_cap"] = math.ceil(L / max(k, 1))  # every latent a candidate: a pure threshold
    elif ours == "gated":
        params["b_mag"], params["r_mag"] = state.pop("b_mag"), state.pop("r_mag")
    if skip:
        params["W_skip"] = state.pop("W_skip")
    if state:
        raise ValueError(f"{folder / WEIGHTS}: tensors {sorted(state)} are not understood for architecture {arch!r}")
    sae_cfg = SAEConfig(**{**base, "architecture": ours, "num_latents": L, "expansion_factor": base.get(
        "expansion_factor", 1), "k": k, "transcode": transcode, "skip_connection": skip,
        "normalize_decoder": _unit_rows(W_dec)})
    sae = build_sae(sae_cfg, d_in, d_out)
    sae.load_state_dict(params, strict=True)
    return sae, cfg
