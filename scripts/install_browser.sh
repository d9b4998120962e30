#!/usr/bin/env bash
# Installs the headless browser of the demo's browser tests: Debian's `chromium` package at /usr/bin/chromium.
# Playwright drives it as the system executable; it never downloads a browser. Idempotent: does nothing if
# chromium is already there. Needs root or passwordless sudo (apt-get). Usage: bash scripts/install_browser.sh
set -euo pipefail
browser=/usr/bin/chromium
if [[ -x $browser ]]; then
  echo "chromium already installed: $browser"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "error: $browser is missing and apt-get is not available; install Chromium with your system's package" \
    "manager so that $browser exists (the browser tests use that executable)" >&2
  exit 1
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  if ! command -v sudo >/dev/null; then
    echo "error: installing chromium needs root; run this script as root (or install sudo)" >&2
    exit 1
  fi
  sudo=(sudo)
fi
if ! "${sudo[@]}" apt-get update || ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y \
    --no-install-recommends chromium; then
  echo "error: apt-get could not install the chromium package (no network or no such package?);" \
    "the demo's browser tests need $browser" >&2
  exit 1
fi
if [[ ! -x $browser ]]; then
  echo "error: the chromium package is installed but $browser is missing" >&2
  exit 1
fi
echo "chromium installed: $browser"
