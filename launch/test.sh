#!/usr/bin/env bash
# The test command (README, CI): set up .venv if needed, then run the whole suite.
# pytest exits non-zero on any failure and with code 5 when no test is collected.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export SAE_KERNEL_BACKEND="${SAE_KERNEL_BACKEND:-eager}" WANDB_MODE=offline HF_HUB_OFFLINE=1
ruff check sae kernels peers tests launch
lint-imports  # the one-way layers and no import cycles (pyproject.toml [tool.importlinter])
# SAELens and sparsify for the interop tests (pytest -m peers), in their own venv (.venv-peers, created
# once; a few minutes). If it cannot be built, those tests skip and say why; everything else still runs.
PEERS_LOG="$(mktemp)"
if bash launch/peers_env.sh >"$PEERS_LOG" 2>&1; then
  export SAE_PEERS_PYTHON="$(tail -n 1 "$PEERS_LOG")"
else
  tail -n 20 "$PEERS_LOG" >&2
  export SAE_PEERS_UNAVAILABLE="launch/peers_env.sh failed (pip could not install sae-lens/eai-sparsify; its output is above)"
fi
rm -f "$PEERS_LOG"
if [ "$#" -eq 0 ]; then set -- tests --durations=15; fi  # the slowest tests, to keep the suite within budget
python -m pytest "$@"
