#!/usr/bin/env bash
# Create .venv (once) and install torch (CPU wheel) + this project with its dev extra.
# Sourced by launch/demo.sh and launch/test.sh; re-installs only when pyproject or pins change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
STAMP=".venv/.installed-$(cat pyproject.toml launch/constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -c launch/constraints-cpu.txt "torch==2.13.0"
  python -m pip install -q -c launch/constraints-cpu.txt -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$STAMP"
fi
# Headless Chromium for the report-rendering test (tests/eval/test_eval_report_e2e.py); only as
# root with apt-get (CI, containers). Elsewhere that test skips and says how to install it.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup.sh: could not install chromium; the report-rendering test will skip" >&2
fi
