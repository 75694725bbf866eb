#!/usr/bin/env bash
# Install headless Chromium and its WebDriver for tests/test_browser.py (Debian
# packages chromium + chromium-driver). Idempotent: apt-get runs only when
# /usr/bin/chromium or /usr/bin/chromedriver is missing. Needs root (or sudo).
# The test drives the system browser through Selenium; nothing is downloaded
# by Selenium or Playwright themselves.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "chromium: $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-browser.sh: run as root (apt-get install chromium chromium-driver)" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
/usr/bin/chromium --version 2>/dev/null | head -n1
