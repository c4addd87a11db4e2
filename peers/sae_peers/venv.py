"""Where the peers' virtual environment is and how sae-forge runs a ``sae_peers`` module in it.

Used from sae-forge's side (benchmarks, :mod:`sae.use.graph`); standard library only. The peers
venv (``bash launch/peers_env.sh``) holds SAELens, sparsify and circuit-tracer with their own pins.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The folder holding the package ``sae_peers`` (the only addition to the peers' ``sys.path``).
PEERS_PATH = Path(__file__).resolve().parent.parent
ROOT = PEERS_PATH.parent


def find_peers_python() -> tuple[str | None, str]:
    """(python of the peers venv, or None; why not): ``$SAE_PEERS_PYTHON``, else this checkout's
    ``.venv-peers/bin/python``."""
    env = os.environ.get("SAE_PEERS_PYTHON")
    if env:
        return (env, "") if Path(env).is_file() else (None, f"SAE_PEERS_PYTHON={env} does not exist")
    p = ROOT / ".venv-peers" / "bin" / "python"
    if p.is_file():
        return str(p), ""
    return None, (f"no peers venv at {p}: create it with `bash launch/peers_env.sh`, or set SAE_PEERS_PYTHON to a "
                  "python that has sae-lens, eai-sparsify and circuit-tracer")


def peer_command(python: str, runner: str, job: Path) -> list[str]:
    """The peers venv's command for ``sae_peers.<runner>`` on ``job``; run it with :func:`peer_env`
    (``-P``: the working directory, the repo root, stays off ``sys.path``)."""
    return [python, "-P", "-m", f"sae_peers.{runner}", str(job)]


def peer_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``peers/`` (the folder of ``sae_peers``) as the only addition to ``PYTHONPATH``."""
    return {**env, "PYTHONPATH": str(PEERS_PATH)}
