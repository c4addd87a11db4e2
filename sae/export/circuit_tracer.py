"""circuit-tracer's transcoder folders (``circuit_tracer`` 0.5.0: attribution graphs over transcoders).

One folder holds all the transcoders of a model, as circuit-tracer's loaders read them (checked
against ``circuit_tracer/transcoder/{single,cross}_layer_transcoder.py`` and
``utils/hf_utils.py``; the peer test loads our exports with them). ``config.yaml`` at the top:
``model_kind``, ``feature_input_hook`` / ``feature_output_hook`` (TransformerLens hook names
inside each block), ``scan``, ``model_name``; here also an ``sae_forge`` section (ignored there)
that lets our import restore the training config.

Per-layer transcoders, ``model_kind: transcoder_set`` (``load_transcoder_set``,
``load_relu_transcoder``; every layer 0..N-1 present, one ``d_transcoder`` for all)::

    layer_{i}.safetensors   W_enc [L, D] (rows = encoder directions, as ours), W_dec [L, D],
                            b_enc [L], b_dec [D], optional W_skip [D, D] (skip = x W_skip^T),
                            optional activation_function.threshold [L] (JumpReLU; else ReLU)

Cross-layer transcoder, ``model_kind: cross_layer_transcoder`` (``load_clt``)::

    W_enc_{i}.safetensors   W_enc_{i} [L, D], b_enc_{i} [L], b_dec_{i} [D], threshold_{i} [L]
    W_dec_{i}.safetensors   W_dec_{i} [L, N - i, D]  (layer i's latents -> MLP outputs i..N-1)

circuit-tracer encodes a = act(W_enc x + b_enc), no pre-encoder bias (as our transcoders), with
act = ReLU or JumpReLU(z) = z 1[z > theta]; its loaders build no TopK. Our JumpReLU is
ReLU(z) 1[ReLU(z) > theta] with theta = exp(log_threshold) > 0: the same map. BatchTopK (per
layer, or per layer group of a CLT) exports as JumpReLU with its inference threshold, as for
SAELens; our BatchTopK also caps each token at ``batch_topk_cap * k`` candidates, so the two
differ only on tokens with more latents above the threshold than that. TopK, Gated, SAEs
(not transcoders), acausal crosscoders and hook points other than ``layers.N.mlp_in`` ->
``layers.N.mlp`` are refused with the reason. Our hook points map to circuit-tracer's MLP wrapper
hooks: ``layers.N.mlp_in`` (the MLP's input, after the pre-MLP norm) is ``mlp.hook_in``,
``layers.N.mlp`` (its output, before any post-MLP norm) is ``mlp.hook_out``. Activation
normalisation is folded into the weights (:mod:`.fold`; a CLT is trained without one).

Import reads these folders (and those circuit-tracer's own ``to_safetensors`` writes, without
config.yaml): a per-layer transcoder into our ``relu`` / ``jumprelu`` classes, a CLT into
:class:`sae.models.clt.CrossLayerTranscoder` (JumpReLU; a ReLU CLT as JumpReLU with threshold 0).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

import sae as sae_pkg
from sae.models import SAEConfig, SparseCoder, build_sae
from sae.train.artifact import save_weights

from .fold import fold_normalization, is_identity
from .item import ExportItem

CONFIG = "config.yaml"
#: The circuit-tracer release whose loaders this format was checked against (tests/export/test_circuit_tracer.py).
FORMAT_VERSION = "0.5.0"
SET, CLT = "transcoder_set", "cross_layer_transcoder"
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"
THRESHOLD = "activation_function.threshold"
#: circuit-tracer hooks (TransformerLens names inside block N) that are exactly one of our aliases.
_HOOK_ALIAS = {"mlp.hook_in": "mlp_in", "ln2.hook_normalized": "mlp_in", "mlp.hook_out": "mlp"}
_IN, _OUT = re.compile(r"layers\.(\d+)\.mlp_in"), re.compile(r"layers\.(\d+)\.mlp")


def layer_file(i: int) -> str:
    return f"layer_{i}.safetensors"


def clt_files(i: int) -> tuple[str, str]:
    return f"W_enc_{i}.safetensors", f"W_dec_{i}.safetensors"


# --- what can be exported ----------------------------------------------------------------------
def _refuse_activation(name: str, sae: SparseCoder) -> None:
    form = sae.export_form
    if form == "topk":
        raise ValueError(f"{name}: circuit-tracer's transcoders are ReLU or JumpReLU (its loaders build no TopK), and "
                         "this one is TopK; train sae=batchtopk or sae=jumprelu (BatchTopK exports as JumpReLU), or "
                         "export with --format ours")
    if form not in ("relu", "jumprelu", "batchtopk"):
        raise ValueError(f"{name}: circuit-tracer has no {sae.architecture!r} activation (ReLU or JumpReLU only); "
                         "export it with --format ours")


def _layer_of(item: ExportItem) -> int:
    """The layer index of a per-layer transcoder, from its hook points."""
    sae, name = item.sae, item.name
    if not sae.cfg.transcode:
        raise ValueError(f"{name}: circuit-tracer loads transcoders (MLP input -> MLP output), and this is an SAE "
                         "(sae.transcode=false); export it with --format saelens or --format ours")
    _refuse_activation(name, sae)
    if sae.d_in != sae.d_out:
        raise ValueError(f"{name}: circuit-tracer transcoders map the residual width to itself, and this one maps "
                         f"d_in={sae.d_in} to d_out={sae.d_out}; export it with --format saelens or --format ours")
    m_in, m_out = _IN.fullmatch(item.hookpoint), _OUT.fullmatch(item.target_hookpoint)
    if not (m_in and m_out and m_in[1] == m_out[1]):
        raise ValueError(f"{name}: circuit-tracer replaces each layer's MLP, so a transcoder must read layers.N.mlp_in "
                         f"and reconstruct layers.N.mlp; this one reads {item.hookpoint or 'an unknown hook point'!r} "
                         f"and reconstructs {item.target_hookpoint or 'an unknown one'!r} (train it with "
                         "data.hookpoint=layers.N.mlp_in data.target_hookpoint=layers.N.mlp)")
    return int(m_in[1])


def _layer_threshold(sae: SparseCoder, name: str) -> Tensor | None:
    """JumpReLU thresholds of a transcoder ([L]; a CLT's [N, L]), None for ReLU; errors name ``name``."""
    try:
        return sae.jumprelu_thresholds()
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def plan_set(items: list[ExportItem]) -> list[ExportItem]:
    """Per-layer transcoders in layer order, after checking circuit-tracer can load them as one set.

    Raises:
        ValueError: the first problem, naming the transcoder and what to do.
    """
    by_layer: dict[int, ExportItem] = {}
    for item in items:
        i = _layer_of(item)
        if i in by_layer:
            raise ValueError(f"{by_layer[i].name} and {item.name} both transcode layer {i}; circuit-tracer takes one "
                             "transcoder per layer: export one of them")
        _layer_threshold(item.sae, item.name)
        by_layer[i] = item
    missing = [i for i in range(max(by_layer) + 1) if i not in by_layer]
    if missing:
        raise ValueError(f"circuit-tracer needs a transcoder for every layer 0..{max(by_layer)}, and layers "
                         f"{', '.join(map(str, missing))} have none; export them together "
                         "(sae-export RUN_0 RUN_1 ... OUT --format circuit-tracer)")
    ordered = [by_layer[i] for i in range(len(by_layer))]
    first = ordered[0].sae
    for item in ordered[1:]:
        s = item.sae
        if (s.d_in, s.num_latents) != (first.d_in, first.num_latents):
            raise ValueError(f"circuit-tracer's transcoders share one width: {ordered[0].name} has d_in={first.d_in}, "
                             f"{first.num_latents} latents, {item.name} d_in={s.d_in}, {s.num_latents}; export "
                             "transcoders of one size")
        if (s.W_skip is None) != (first.W_skip is None):
            raise ValueError(f"circuit-tracer's transcoders all have a skip connection or none do: {item.name} and "
                             f"{ordered[0].name} differ; export transcoders trained alike (sae.skip_connection)")
    return ordered


def _clt_hooks(item: ExportItem, n: int) -> None:
    """Check the CLT's recorded hook points (cfg.json ``clt``, when recorded) are layers.i.mlp_in -> .mlp, i < N."""
    rec = (item.meta or {}).get("clt") or {}
    ins, outs = rec.get("inputs"), rec.get("targets")
    want_in, want_out = [f"layers.{i}.mlp_in" for i in range(n)], [f"layers.{i}.mlp" for i in range(n)]
    if (ins is not None and list(ins) != want_in) or (outs is not None and list(outs) != want_out):
        raise ValueError(f"{item.name}: circuit-tracer's CLT covers the model's layers from 0 (layer i reads "
                         f"layers.i.mlp_in and writes layers.i..{n - 1}.mlp), and this one reads {ins} and writes "
                         f"{outs}; train it on layers 0..N-1 (data.hookpoints) or export with --format ours")


def check_clt(item: ExportItem) -> None:
    """Raise ``ValueError`` when circuit-tracer cannot represent the CLT ``item``."""
    sae, name = item.sae, item.name
    if sae.acausal:
        raise ValueError(f"{name}: circuit-tracer's CLT is causal (layer i's latents write layers i..N-1), and this is "
                         "an acausal crosscoder (sae.clt_acausal=true); export it with --format ours")
    if not sae.cfg.transcode:
        raise ValueError(f"{name}: this multi-layer coder reconstructs its own input (sae.transcode=false), not the "
                         "MLP outputs circuit-tracer replaces; export it with --format ours")
    if sae.activation == "topk":
        raise ValueError(f"{name}: circuit-tracer's CLT is ReLU or JumpReLU (no TopK), and this one is TopK; train "
                         "sae.clt_activation=jumprelu or batchtopk (exported as JumpReLU), or use --format ours")
    _layer_threshold(sae, name)  # a BatchTopK CLT's thresholds must be estimated
    _clt_hooks(item, sae.n_layers)


def check_exportable(items: list[ExportItem]) -> None:
    """Raise ``ValueError`` when ``items`` cannot form one circuit-tracer folder."""
    clts = [i for i in items if i.sae.cross_layer]
    if clts and len(items) > 1:
        raise ValueError(f"a circuit-tracer folder holds one cross-layer transcoder or one set of per-layer "
                         f"transcoders; got {len(items)} coders including the CLT {clts[0].name}: export the CLT "
                         "on its own")
    if clts:
        check_clt(clts[0])
    else:
        plan_set(items)


# --- export ------------------------------------------------------------------------------------------
def _save(tensors: dict[str, Tensor], path: Path, dtype: torch.dtype) -> None:
    save_weights({k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}, path,
                 metadata={"format": "pt"})


def _provenance(item: ExportItem, sae: SparseCoder) -> dict[str, Any]:
    act_scale = getattr(sae, "act_scale", None)
    return {"name": item.name, "hookpoint": item.hookpoint, "target_hookpoint": item.target_hookpoint,
            "architecture": sae.architecture, "sae": dataclasses.asdict(sae.cfg),
            "act_scale": act_scale.tolist() if isinstance(act_scale, Tensor) else act_scale,
            "normalization_folded": not is_identity(item.meta.get("normalization")),
            "tokens": item.tokens, "steps": item.steps, "metrics": item.metrics}


def _write_set(items: list[ExportItem], out: Path, dtype: torch.dtype) -> list[dict[str, Any]]:
    layers = []
    for i, item in enumerate(plan_set(items)):
        sae = fold_normalization(item.sae, item.meta.get("normalization"))
        tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}
        thr = _layer_threshold(sae, item.name)
        if thr is not None:
            tensors[THRESHOLD] = thr
        if sae.W_skip is not None:
            tensors["W_skip"] = sae.W_skip
        _save(tensors, out / layer_file(i), dtype)
        layers.append(_provenance(item, item.sae))
    return layers


def _write_clt(item: ExportItem, out: Path, dtype: torch.dtype) -> list[dict[str, Any]]:
    check_clt(item)
    sae = fold_normalization(item.sae, item.meta.get("normalization"))  # its per-layer normalisers
    thr = sae.jumprelu_thresholds()
    for i in range(sae.n_layers):
        enc, dec = clt_files(i)
        _save({f"W_enc_{i}": sae.W_enc[i], f"b_enc_{i}": sae.b_enc[i], f"b_dec_{i}": sae.b_dec[i],
               f"threshold_{i}": thr[i]}, out / enc, dtype)
        _save({f"W_dec_{i}": sae.W_dec[i]}, out / dec, dtype)
    return [_provenance(item, item.sae)]


def write_circuit_tracer(items: list[ExportItem], out: Path, dtype: torch.dtype = torch.float32,
                         repo_id: str = "", name: str = "") -> None:
    """Write ``items`` (per-layer transcoders, or one CLT) as one circuit-tracer folder ``out``.

    ``out`` should be new or empty: circuit-tracer counts layers by globbing, so a file of an earlier,
    larger export would be read as a layer. ``name`` is the folder's final name (the ``scan`` when
    there is no ``repo_id``; default ``out``'s name).

    Raises:
        ValueError: what circuit-tracer cannot represent (checked before anything is written).
    """
    check_exportable(items)
    out.mkdir(parents=True, exist_ok=True)
    clt = items[0].sae.cross_layer
    layers = _write_clt(items[0], out, dtype) if clt else _write_set(items, out, dtype)
    model = next((i.model_name for i in items if i.model_name), "")
    cfg: dict[str, Any] = {"model_kind": CLT if clt else SET, "feature_input_hook": INPUT_HOOK,
                           "feature_output_hook": OUTPUT_HOOK, "scan": repo_id or f"sae-forge/{name or out.name}"}
    if model:
        cfg["model_name"] = model
    cfg["sae_forge"] = {"version": sae_pkg.__version__, "circuit_tracer_version": FORMAT_VERSION,
                        "dtype": str(dtype).removeprefix("torch."), "layers": layers}
    (out / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))


def _metric(item: ExportItem, key: str) -> str:
    v = item.metrics.get(key)
    return f"{v:.4g}" if isinstance(v, (int, float)) and v == v else "-"


def card(items: list[ExportItem], repo_id: str = "") -> str:
    """README.md of a circuit-tracer export: the Hub header, the transcoders, how to load them."""
    clt = items[0].sae.cross_layer
    ordered = items if clt else plan_set(items)
    model = next((i.model_name for i in items if i.model_name), "")
    tags = ["sparse-autoencoder", "interpretability", "transcoder", "circuit-tracer"] + (
        ["cross-layer-transcoder"] if clt else [])
    head = "---\nlibrary_name: circuit-tracer\ntags:\n" + "".join(f"- {t}\n" for t in tags)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):
        head += f"base_model:\n- {model}\n"
    repo, name = repo_id or "<repo id>", model or "<model>"
    ours = "" if clt else ', hookpoint="layers.0.mlp_in"'
    if clt:
        sae = items[0].sae
        act = "JumpReLU" + (" (BatchTopK's thresholds)" if sae.activation == "batchtopk" else "")
        what = (f"One cross-layer transcoder over {sae.n_layers} layers: {sae.latents_per_layer} {act} latents per "
                f"layer, d_model {sae.d_model}; layer i's latents read `layers.i.mlp_in` and write the MLP outputs "
                f"of layers i..{sae.n_layers - 1}.\n\nFVU {_metric(items[0], 'fvu')}, L0 {_metric(items[0], 'l0')}.")
        local = ('from circuit_tracer.transcoder.cross_layer_transcoder import load_clt\n'
                 f'clt = load_clt("<folder>", feature_input_hook="{INPUT_HOOK}", feature_output_hook="{OUTPUT_HOOK}", '
                 'dtype=torch.float32)')
    else:
        rows = "".join(f"| {i} | `{layer_file(i)}` | {it.sae.architecture} | {it.hookpoint} -> {it.target_hookpoint} "
                       f"| {it.sae.num_latents} | {_metric(it, 'fvu')} | {_metric(it, 'l0')} |\n"
                       for i, it in enumerate(ordered))
        what = ("| layer | file | trained as | hook points | d_transcoder | FVU | L0 |\n|---|---|---|---|---|---|---|\n"
                + rows + "\nReLU transcoders load as ReLU; JumpReLU and BatchTopK as JumpReLU (per-latent thresholds).")
        local = ('import glob\nfrom circuit_tracer.transcoder import load_transcoder_set\n'
                 'n = len(glob.glob("<folder>/layer_*.safetensors"))\n'
                 'transcoders = load_transcoder_set({i: f"<folder>/layer_{i}.safetensors" for i in range(n)}, '
                 f'scan="<folder>", feature_input_hook="{INPUT_HOOK}", feature_output_hook="{OUTPUT_HOOK}")')
    return (f"{head}---\n\n# {'Cross-layer transcoder' if clt else 'Per-layer transcoders'} for circuit-tracer\n\n"
            f"Trained with sae-forge on {model or 'an unrecorded model'}, exported for circuit-tracer "
            f"{FORMAT_VERSION} (`{CONFIG}`: `{INPUT_HOOK}` -> `{OUTPUT_HOOK}`, the MLP's input and output).\n\n"
            f"{what}\n\n## How to load\n\n```python\nimport torch\nfrom circuit_tracer import ReplacementModel\n"
            f'model = ReplacementModel.from_pretrained("{name}", "{repo}")   # from the Hub\n\n'
            f"# from a local copy\n{local}\n"
            f'model = ReplacementModel.from_pretrained_and_transcoders("{name}", '
            f"{'clt' if clt else 'transcoders'})\n```\n\n"
            f"In sae-forge: `load_pretrained(\"{repo}\"{ours})` (also a local folder).\n"
            "The weights expect raw model activations (the training normalisation is folded in).\n")


# --- import ------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """One coder read from a circuit-tracer folder."""

    sae: SparseCoder
    name: str
    hookpoint: str
    target_hookpoint: str
    model_name: str
    cfg: dict[str, Any]


def read_config(folder: Path) -> dict[str, Any] | None:
    """config.yaml of a circuit-tracer folder, or what its files imply when it has none; None: not one."""
    folder = Path(folder)
    if (folder / CONFIG).is_file():
        try:
            cfg = yaml.safe_load((folder / CONFIG).read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            return None  # another tool's config.yaml (a Hydra run's, ...)
        if isinstance(cfg, dict) and cfg.get("model_kind") in (SET, CLT):
            return cfg
        return None
    if (folder / layer_file(0)).is_file():
        return {"model_kind": SET}
    if all((folder / f).is_file() for f in clt_files(0)):
        return {"model_kind": CLT}
    return None


def _alias(hook: str | None, layer: int, default: str) -> str:
    suffix = _HOOK_ALIAS.get(hook or "")
    if hook is None or suffix is None:
        return f"blocks.{layer}.{hook}" if hook else f"layers.{layer}.{default}"
    return f"layers.{layer}.{suffix}"


def _restored(cfg: dict[str, Any], i: int) -> dict[str, Any]:
    layers = (cfg.get("sae_forge") or {}).get("layers") or []
    return layers[i] if i < len(layers) and isinstance(layers[i], dict) else {}


def _base_cfg(restored: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(SAEConfig)}
    return {k: v for k, v in (restored.get("sae") or {}).items() if k in fields}


def _log_threshold(thr: Tensor, where: Path) -> Tensor:
    if bool((thr < 0).any()):
        raise ValueError(f"{where}: negative JumpReLU thresholds let negative pre-activations through in "
                         "circuit-tracer, which our JumpReLU (ReLU first) cannot represent")
    return thr.log()  # a threshold of 0 (log -inf) is a ReLU, exactly


def _unit_rows(rows: Tensor) -> bool:
    return bool(((rows.norm(dim=1) - 1).abs() < 1e-3).all())


def read_layer(folder: Path, cfg: dict[str, Any], i: int) -> Loaded:
    """Per-layer transcoder ``i`` of a ``transcoder_set`` folder."""
    path = folder / layer_file(i)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    try:
        params = {k: state.pop(k) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    except KeyError as e:
        raise ValueError(f"{path} has no {e.args[0]} tensor: not a circuit-tracer transcoder") from None
    thr, skip = state.pop(THRESHOLD, None), state.pop("W_skip", None)
    if state:
        raise ValueError(f"{path}: tensors {sorted(state)} are not part of circuit-tracer's transcoder format")
    restored = _restored(cfg, i)
    (L, d), arch = params["W_enc"].shape, "relu" if thr is None else "jumprelu"
    base = _base_cfg(restored)
    k = min(max(int(base.get("k", 32)), 1), L - 1) if arch == "jumprelu" else int(base.get("k", 32))
    if thr is not None:
        params["log_threshold"] = _log_threshold(thr, path)
        act_scale = restored.get("act_scale")
        params["act_scale"] = torch.tensor(float(act_scale) if isinstance(act_scale, (int, float)) else 1.0)
    if skip is not None:
        params["W_skip"] = skip
    sae_cfg = SAEConfig(**{**base, "architecture": arch, "num_latents": L, "k": k, "transcode": True,
                           "skip_connection": skip is not None, "normalize_decoder": _unit_rows(params["W_dec"]),
                           "expansion_factor": base.get("expansion_factor", 1)})
    sae = build_sae(sae_cfg, d, params["b_dec"].shape[0])
    sae.load_state_dict(params, strict=True)
    hp = restored.get("hookpoint") or _alias(cfg.get("feature_input_hook"), i, "mlp_in")
    target = restored.get("target_hookpoint") or _alias(cfg.get("feature_output_hook"), i, "mlp")
    return Loaded(sae, restored.get("name") or f"layer_{i}", hp, target, cfg.get("model_name") or "", cfg)


def read_clt(folder: Path, cfg: dict[str, Any]) -> Loaded:
    """The cross-layer transcoder of a ``cross_layer_transcoder`` folder."""
    n = len(list(folder.glob("W_enc_*.safetensors")))  # circuit-tracer counts layers the same way
    enc = [load_file(str(folder / clt_files(i)[0])) for i in range(n)]
    dec = [load_file(str(folder / clt_files(i)[1]))[f"W_dec_{i}"].float() for i in range(n)]
    L, m = enc[0]["W_enc_0"].shape
    thr = [e.get(f"threshold_{i}") for i, e in enumerate(enc)]
    if any(t is None for t in thr) and any(t is not None for t in thr):
        raise ValueError(f"{folder}: some layers have a JumpReLU threshold and others not; circuit-tracer reads "
                         "threshold_i for every layer i or for none")
    restored = _restored(cfg, 0)
    base = _base_cfg(restored)
    rows = torch.cat([W.reshape(L, -1) for W in dec], 1) if n else torch.zeros(0, 0)
    sae_cfg = SAEConfig(**{**base, "architecture": "clt", "clt_layers": n, "num_latents": L, "clt_activation":
                           "jumprelu", "clt_acausal": False, "transcode": True, "skip_connection": False,
                           "k": min(max(int(base.get("k", 32)), 1), L - 1), "normalize_decoder": _unit_rows(rows)})
    sae = build_sae(sae_cfg, n * m, n * m)
    act_scale = restored.get("act_scale")
    threshold = torch.stack([t.float().reshape(L) if t is not None else torch.zeros(L) for t in thr])
    params = {"W_enc": torch.stack([e[f"W_enc_{i}"].float() for i, e in enumerate(enc)]),
              "b_enc": torch.stack([e[f"b_enc_{i}"].float() for i, e in enumerate(enc)]),
              "b_dec": torch.stack([e[f"b_dec_{i}"].float() for i, e in enumerate(enc)]),
              "log_threshold": _log_threshold(threshold, folder),
              "act_scale": torch.tensor(act_scale, dtype=torch.float32) if isinstance(act_scale, list)
              else torch.ones(n), **{f"W_dec.{i}": W for i, W in enumerate(dec)}}
    sae.load_state_dict(params, strict=True)
    return Loaded(sae, restored.get("name") or folder.name, restored.get("hookpoint") or "",
                  restored.get("target_hookpoint") or "", cfg.get("model_name") or "", cfg)


def layer_names(folder: Path, cfg: dict[str, Any]) -> dict[int, str]:
    """Layer index -> input hook point of each transcoder file of a ``transcoder_set`` folder."""
    found = sorted(int(m[1]) for p in folder.glob("layer_*.safetensors") if (m := re.fullmatch(r"layer_(\d+)", p.stem)))
    return {i: _restored(cfg, i).get("hookpoint") or _alias(cfg.get("feature_input_hook"), i, "mlp_in") for i in found}


def _pick(names: dict[int, str], hookpoint: str) -> int | None:
    """The layer ``hookpoint`` names: an input hook point or a file stem ``layer_N``."""
    for i, name in names.items():
        if hookpoint in (name, f"layer_{i}"):
            return i
    return None


def read_circuit_tracer(folder: str | Path, hookpoint: str | None = None) -> Loaded:
    """The coder in a circuit-tracer folder: its CLT, or one transcoder of its set.

    Args:
        hookpoint: which transcoder of a set with several: its input hook point
            (``layers.3.mlp_in``) or file stem (``layer_3``).

    Raises:
        FileNotFoundError: not a circuit-tracer folder. ValueError: several transcoders and no (or an
        unknown) ``hookpoint``, or tensors we cannot represent.
    """
    folder = Path(folder)
    cfg = read_config(folder)
    if cfg is None:
        raise FileNotFoundError(f"{folder} is not a circuit-tracer folder (no {CONFIG} with a model_kind, "
                                f"{layer_file(0)} or {clt_files(0)[0]})")
    if cfg["model_kind"] == CLT:
        return read_clt(folder, cfg)
    names = layer_names(folder, cfg)
    if not names and cfg.get("transcoders"):
        raise ValueError(f"{folder / CONFIG} lists its transcoders as URIs ({str(cfg['transcoders'][0])[:80]}, ...) "
                         f"rather than holding {layer_file(0)} files: that layout is not read here; download the "
                         "files into one folder beside a config.yaml (circuit-tracer's own loaders do so)")
    if hookpoint is None and len(names) == 1:
        return read_layer(folder, cfg, next(iter(names)))
    i = _pick(names, hookpoint) if hookpoint else None
    if i is not None:
        return read_layer(folder, cfg, i)
    shown = ", ".join(list(names.values())[:6]) + (", ..." if len(names) > 6 else "")
    raise ValueError(f"{folder} holds {len(names)} circuit-tracer transcoders ({shown}); choose one with "
                     f"hookpoint=<its input hook point or layer_N>" + (f", not {hookpoint!r}" if hookpoint else ""))


def read_all(folder: str | Path) -> list[Loaded]:
    """Every coder of a circuit-tracer folder, in layer order (one for a CLT)."""
    folder = Path(folder)
    cfg = read_config(folder)
    if cfg is None:
        raise FileNotFoundError(f"{folder} is not a circuit-tracer folder")
    if cfg["model_kind"] == CLT:
        return [read_clt(folder, cfg)]
    return [read_layer(folder, cfg, i) for i in layer_names(folder, cfg)]


def download(repo_id: str, hookpoint: str | None = None, *, revision: str | None = None) -> Path | None:
    """Download a circuit-tracer Hub repo (config.yaml at its root; of a set, only ``hookpoint``'s
    layer file when it names one); None when the repo has no circuit-tracer config.yaml."""
    from huggingface_hub import snapshot_download

    root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG]))
    cfg = read_config(root) if (root / CONFIG).is_file() else None
    if cfg is None:
        return None
    files = ["*.safetensors"]
    if cfg["model_kind"] == SET and hookpoint:
        m, listed = re.fullmatch(r"layer_(\d+)", hookpoint), [layer.get("hookpoint") for layer in
                                                              (cfg.get("sae_forge") or {}).get("layers") or []]
        alias = _IN.fullmatch(hookpoint) if _HOOK_ALIAS.get(cfg.get("feature_input_hook", "")) == "mlp_in" else None
        i = int(m[1]) if m else listed.index(hookpoint) if hookpoint in listed else int(alias[1]) if alias else None
        files = [layer_file(i)] if i is not None else files
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG, *files]))
