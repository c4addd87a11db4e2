#!/usr/bin/env bash
# Create .venv-peers (once): SAELens, EleutherAI sparsify and circuit-tracer next to the CPU torch wheel, apart from
# .venv because their dependency pins may clash with ours. The interop tests (pytest -m peers) run
# small scripts inside it. Idempotent: re-installs only when launch/constraints-peers.txt changes.
# Usage: bash launch/peers_env.sh        (prints the venv's python on success)
#        SAE_PEERS_VENV=/path/venv bash launch/peers_env.sh    (elsewhere; tests read SAE_PEERS_PYTHON)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="${SAE_PEERS_VENV:-.venv-peers}"
STAMP="$VENV/.installed-$(sha256sum launch/constraints-peers.txt | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -qq --upgrade pip
  "$VENV/bin/python" -m pip install -qq -c launch/constraints-peers.txt "torch==2.13.0"
  "$VENV/bin/python" -m pip install -qq -c launch/constraints-peers.txt sae-lens eai-sparsify circuit-tracer safetensors
  SPARSIFY_DISABLE_TRITON=1 "$VENV/bin/python" -c "import sae_lens, sparsify, circuit_tracer.transcoder, circuit_tracer.utils.hf_utils" >/dev/null
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
echo "$(cd "$VENV" && pwd)/bin/python"
