"""Attribution graphs through circuit-tracer: hand it an exported transcoder folder, get its scores.

circuit-tracer (0.5.0) is the engine; it pins transformers 4.57, so it runs in the peers venv
(``bash launch/peers_env.sh``) as ``sae_peers.graph`` and this module only prepares the job, checks
everything it can before the long work starts, and reads the result:

- :func:`check_transcoders`: the folder is circuit-tracer's (``config.yaml``, from ``sae-export
  --format circuit-tracer``), holds one transcoder per layer 0..N-1 of the model (or a CLT over
  all of them) and has the model's width, and the model is a causal LM; each problem is named with
  its fix, from file headers only (no weights are read).
- :func:`trace`: per prompt, circuit-tracer's ``attribute`` builds the graph and its
  ``compute_graph_scores`` gives the *replacement score* (the share of the input tokens' influence
  on the output logits that flows through features rather than error nodes) and the *completeness
  score* (the share of every node's input, weighted by its influence on the logits, that comes from
  features or tokens rather than error nodes), both in [0, 1], higher meaning less of the model's
  computation is left unexplained (Ameisen et al. 2025, "Circuit Tracing").

The cost grows with the active features times the prompt length: keep the transcoders' L0 low
(tens) and ``max_feature_nodes`` in the low thousands on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sae_peers.venv import find_peers_python, peer_command, peer_env
from safetensors import safe_open

from sae.harvest.gguf import cache_root
from sae.harvest.model import resolve_model_path

CONFIG = "config.yaml"
_LAYER = re.compile(r"layer_(\d+)\.safetensors")
_CLT = re.compile(r"W_enc_(\d+)\.safetensors")


@dataclass
class GraphSettings:
    """What circuit-tracer's ``attribute`` is given for every prompt."""

    prompts: list[str] = field(default_factory=lambda: ["The capital of France is"])
    max_feature_nodes: int = 1024  # features kept in the graph (cost and memory grow with it)
    batch_size: int = 256  # source nodes per backward pass
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    threads: int = 0  # torch threads in the peers process (0: its default)


@dataclass
class TranscoderFolder:
    """What :func:`check_transcoders` read from a circuit-tracer folder's headers."""

    path: Path
    kind: str  # transcoder_set | cross_layer_transcoder
    n_layers: int
    d_model: int
    d_transcoder: int
    model_name: str


def _shape(path: Path, key: str) -> list[int]:
    with safe_open(str(path), "pt") as f:
        return list(f.get_slice(key).get_shape())


def check_transcoders(folder: str | Path) -> TranscoderFolder:
    """Read and check a circuit-tracer folder's layout (no weights loaded).

    Raises:
        ValueError: not a circuit-tracer folder, or a layer missing, or widths that differ.
    """
    path = Path(folder).expanduser().resolve()
    if not (path / CONFIG).is_file():
        raise ValueError(f"{path} holds no {CONFIG}: it is not a circuit-tracer transcoder folder; write one with "
                         "sae-export RUN_OR_SAE_FOLDERS OUT --format circuit-tracer")
    cfg = yaml.safe_load((path / CONFIG).read_text()) or {}
    kind = cfg.get("model_kind")
    pattern = {"transcoder_set": _LAYER, "cross_layer_transcoder": _CLT}.get(kind)
    if pattern is None:
        raise ValueError(f"{path / CONFIG}: model_kind={kind!r}; circuit-tracer loads transcoder_set or "
                         "cross_layer_transcoder (sae-export --format circuit-tracer writes one of them)")
    layers = sorted(int(m[1]) for p in path.iterdir() if (m := pattern.fullmatch(p.name)))
    if not layers:
        raise ValueError(f"{path} holds no transcoder files ({pattern.pattern})")
    n = layers[-1] + 1
    missing = sorted(set(range(n)) - set(layers))
    if missing:
        raise ValueError(f"{path}: no transcoder for layer(s) {missing} of 0..{n - 1}; circuit-tracer replaces every "
                         "layer's MLP: train and export a transcoder for each (data.hookpoints=[layers.*.mlp_in] "
                         "data.target_hookpoints=[layers.*.mlp])")
    first = path / (f"layer_{0}.safetensors" if kind == "transcoder_set" else "W_enc_0.safetensors")
    d_transcoder, d_model = _shape(first, "W_enc" if kind == "transcoder_set" else "W_enc_0")
    if kind == "transcoder_set":
        for i in layers[1:]:
            shape = _shape(path / f"layer_{i}.safetensors", "W_enc")
            if shape != [d_transcoder, d_model]:
                raise ValueError(f"{path}: layer {i}'s encoder is {shape}, layer 0's [{d_transcoder}, {d_model}]; "
                                 "circuit-tracer's transcoders share one width: export transcoders of one size")
    return TranscoderFolder(path, kind, n, d_model, d_transcoder, str(cfg.get("model_name") or ""))


def check_model(model: str, folder: TranscoderFolder) -> Path:
    """The model's local folder, after checking circuit-tracer can trace ``folder`` on it.

    Raises:
        ValueError: not a local causal LM, or another depth or width than the transcoders'.
    """
    path = Path(resolve_model_path(model))
    if not (path / "config.json").is_file():
        raise ValueError(f"model {model!r} is not a local Hugging Face folder ({path}); give model.name=smollm2 or "
                         "a folder with config.json (no model is downloaded)")
    cfg = json.loads((path / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise ValueError(f"model {model!r} is a {archs or cfg.get('model_type')}, not a causal language model: "
                         "circuit-tracer traces next-token logits of decoder LMs (e.g. model=smollm2)")
    n, d = cfg.get("num_hidden_layers", cfg.get("n_layer")), cfg.get("hidden_size", cfg.get("n_embd"))
    if (n, d) != (folder.n_layers, folder.d_model):
        raise ValueError(f"{folder.path} has transcoders for {folder.n_layers} layers of width {folder.d_model}, "
                         f"but model {model!r} has {n} layers of width {d}: trace it on the model the transcoders "
                         "were trained on (--model), or train a transcoder for each of its layers")
    return path


def _view_dir(model_dir: Path) -> Path:
    """Where the peers process keeps its transformers-4 view of ``model_dir`` (our cache, never
    beside a user's folder)."""
    tag = hashlib.sha256(str(model_dir).encode()).hexdigest()[:12]
    return cache_root() / "circuit-tracer-models" / f"{model_dir.name}-{tag}"


def trace(folder: str | Path, settings: GraphSettings, *, model: str = "", graphs_dir: str | Path | None = None,
          timeout: float | None = None) -> dict[str, Any]:
    """Graphs of ``settings.prompts`` through the transcoders in ``folder`` (circuit-tracer's), on
    ``model`` (default: the one ``folder``'s config.yaml names). Returns the peers process's
    result: per prompt its scores, tokens, features and seconds, and their ``mean``.

    Raises:
        ValueError: bad inputs (checked first), or circuit-tracer's refusal, with its message.
        RuntimeError: the peers venv is missing, or its process failed.
    """
    if not settings.prompts or not all(isinstance(p, str) and p.strip() for p in settings.prompts):
        raise ValueError("give at least one non-empty prompt to trace")
    tc = check_transcoders(folder)
    name = model or tc.model_name
    if not name:
        raise ValueError(f"{tc.path / CONFIG} names no model: pass the model the transcoders were trained on "
                         "(--model smollm2)")
    model_dir = check_model(name, tc)
    python, why = find_peers_python()
    if python is None:
        raise RuntimeError(f"circuit-tracer runs in the peers venv, which is missing: {why}")
    with tempfile.TemporaryDirectory(prefix="sae-graph-") as tmp:
        job = {**asdict(settings), "model": str(model_dir), "view_dir": str(_view_dir(model_dir)),
               "transcoders": str(tc.path), "out": str(Path(tmp) / "result.json"),
               "graphs_dir": str(Path(graphs_dir).resolve()) if graphs_dir else ""}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        env = peer_env({**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        proc = subprocess.run(peer_command(python, "graph", Path(tmp) / "job.json"), env=env, capture_output=True,
                              text=True, timeout=timeout)
        result_file = Path(tmp) / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if "error" in result:
        raise ValueError(f"circuit-tracer: {result['error']}")
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"circuit-tracer's process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result.update(transcoders=str(tc.path), model=name, kind=tc.kind, n_layers=tc.n_layers,
                  d_transcoder=tc.d_transcoder)
    return result


def format_scores(result: dict[str, Any]) -> str:
    """A Markdown table of a :func:`trace` result, one row per prompt and the mean."""
    lines = ["| prompt | tokens | active features | graph features | replacement | completeness | s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["prompts"]:
        text = r["prompt"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {text[:48]} | {r['tokens']} | {r['active_features']} | {r['selected_features']} | "
                     f"{r['replacement_score']:.4f} | {r['completeness_score']:.4f} | {r['seconds']:.1f} |")
    m = result["mean"]
    lines.append(f"| **mean** | | | | **{m['replacement_score']:.4f}** | **{m['completeness_score']:.4f}** | |")
    return "\n".join(lines)
