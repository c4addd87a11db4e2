"""The repo root shadows no installed package.

``python -m ...`` and ``python -c ...`` run from the repo root (and ``python -m pytest``) put the root
first on ``sys.path``. A top-level folder holding an ``__init__.py`` is then imported under its folder
name ahead of site-packages: the old ``kernels/__init__.py`` hid Hugging Face's PyPI package
``kernels``, which ``transformers.activations`` imports since transformers 5.25, and every README
``python -m`` command failed. These tests run such commands from the root in subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# `sae` is our own package: from the root it resolves to the very folder the editable install maps.
OWN_TOP_LEVEL = {"sae"}


def _readme_modules() -> list[str]:
    """Every ``python -m sae.X`` of the README, the table's ``sae.bench.<a|b|c>`` spelled out."""
    text = (ROOT / "README.md").read_text()
    mods = set(re.findall(r"python -m (sae(?:\.[A-Za-z_]+)+)\b(?![.<])", text))
    for base, alts in re.findall(r"python -m (sae(?:\.[A-Za-z_]+)*)\.<([^>]+)>", text):
        mods.update(f"{base}.{alt.strip()}" for alt in alts.replace("\\|", "|").split("|"))
    return sorted(mods)


def _run_from_root(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_no_top_level_folder_is_importable_under_its_own_name():
    """Each top-level name, resolved from the root, is ours (`sae`) or comes from site-packages.

    Fails the old layout (kernels/__init__.py, conf/__init__.py at the root) whatever is installed.
    """
    names = sorted(p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()
                   if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".py"))
    probe = ("import importlib.util, json, sys\n"
             "out = {}\n"
             "for n in sys.argv[1:]:\n"
             "    try:\n"
             "        s = importlib.util.find_spec(n)\n"
             "    except (ImportError, ValueError):\n"
             "        s = None\n"
             "    out[n] = None if s is None else (s.origin, list(s.submodule_search_locations or []))\n"
             "print(json.dumps(out))\n")
    res = _run_from_root("-c", probe, *names)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout.strip().splitlines()[-1])
    shadowing = {}
    for name, spec in found.items():
        if spec is None or name in OWN_TOP_LEVEL:
            continue
        origin = spec[0]
        # A namespace portion (a folder without __init__.py, origin None) never hides a regular package
        # found later on sys.path; a module (root/NAME.py) or a package (root/NAME/__init__.py) does.
        if origin not in (None, "namespace") and ROOT in Path(origin).resolve().parents[:2]:
            shadowing[name] = origin
    assert not shadowing, (f"top-level names importable from the repo root: {shadowing}; move the code into a "
                           "package folder below them (as kernels/sae_kernels, conf/sae_conf)")


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None,
                    reason="Hugging Face's `kernels` package is not installed (transformers < 5.25)")
def test_hf_kernels_and_transformers_activations_import_from_the_root():
    res = _run_from_root("-c", "import transformers.activations, kernels; print(kernels.__file__)")
    assert res.returncode == 0, res.stderr[-2000:]
    origin = Path(res.stdout.strip().splitlines()[-1]).resolve()
    assert not origin.is_relative_to(ROOT / "kernels"), f"`import kernels` from the root found ours: {origin}"


def test_readme_python_m_commands_run_from_the_root():
    mods = _readme_modules()
    assert "sae.bench.train_step" in mods and "sae.train.reshard" in mods, mods  # the parser still sees them
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for m in mods}
    failed = {}
    for m, p in procs.items():
        _, err = p.communicate(timeout=180)
        if p.returncode != 0:
            failed[m] = err.strip().splitlines()[-1:] if err.strip() else p.returncode
    assert not failed, f"`python -m MODULE --help` from the repo root failed: {failed}"
