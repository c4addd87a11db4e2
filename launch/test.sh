#!/usr/bin/env bash
# The test command (README, CI): set up .venv if needed, then run the whole suite.
# pytest exits non-zero on any failure and with code 5 when no test is collected.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export SAE_KERNEL_BACKEND="${SAE_KERNEL_BACKEND:-eager}" WANDB_MODE=offline HF_HUB_OFFLINE=1
ruff check sae kernels tests
if [ "$#" -eq 0 ]; then set -- tests; fi
python -m pytest "$@"
