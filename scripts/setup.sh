#!/usr/bin/env bash
# Sets up .venv for PerceptionDLM on a CPU machine and installs the package (editable) with the given extras.
# The CPU build of torch is pinned by constraints/cpu.txt, so that no dependency swaps in a multi-GB CUDA
# build. GPU machines use `uv sync` instead (README, "Installation").
# Usage: bash scripts/setup.sh [EXTRAS]      e.g. bash scripts/setup.sh dev   or   bash scripts/setup.sh dev,train
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: PerceptionDLM needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
spec="."
[[ -n ${1:-} ]] && spec=".[$1]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e "$spec" \
  2> >(grep -v "^WARNING: Location" >&2)
# The development set-up also needs a browser for the web demo's end-to-end tests (Debian's chromium; Playwright
# drives the system executable and never downloads one).
if [[ ,${1:-}, == *,dev,* ]]; then
  bash scripts/install_browser.sh
fi
