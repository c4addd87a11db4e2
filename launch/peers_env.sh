#!/usr/bin/env bash
# Create .venv-peers (once): SAELens, EleutherAI sparsify and circuit-tracer next to the CPU torch wheel, apart from
# .venv because their dependency pins may clash with ours. The interop tests (pytest -m peers) run
# small scripts inside it. Idempotent: rebuilt from scratch when launch/lock/peers.txt
# (every package pinned; refresh: bash launch/lock.sh) changes.
# Usage: bash launch/peers_env.sh        (prints the venv's python on success)
#        SAE_PEERS_VENV=/path/venv bash launch/peers_env.sh    (elsewhere; tests read SAE_PEERS_PYTHON)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="${SAE_PEERS_VENV:-.venv-peers}"
STAMP="$VENV/.locked-$(sha256sum launch/lock/peers.txt | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
    echo "peers_env.sh: $VENV exists and is not a virtualenv; refusing to replace it (set SAE_PEERS_VENV to a new path)" >&2
    exit 2
  fi
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -r launch/lock/peers.txt
  SPARSIFY_DISABLE_TRITON=1 "$VENV/bin/python" -c "import sae_lens, sparsify, circuit_tracer.transcoder, circuit_tracer.utils.hf_utils" >/dev/null
  touch "$STAMP"
fi
echo "$(cd "$VENV" && pwd)/bin/python"
