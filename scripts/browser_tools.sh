#!/usr/bin/env bash
# Installs what the workbench's browser tests (tests/test_workbench_browser.py) need, and
# prints where it is, as shell assignments for eval "$(scripts/browser_tools.sh)":
#   BROWSER_BIN=...        Debian's `chromium` (run headless by the tests)
#   CHROMEDRIVER_BIN=...   Debian's `chromium-driver`, the WebDriver server of that very build
#
# Both come from Debian's packages (apt-get, as root or with sudo), once per machine. Selenium
# (PyPI, in requirements.lock) is pointed at them, so its Selenium Manager never downloads a
# browser or a driver (nothing but the package registries is reachable from here).
# Progress goes to stderr.
set -euo pipefail

fail() {
  echo "error: $*" >&2
  exit 1
}

find_browser() {
  for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null 2>&1; then
      command -v "$name"
      return
    fi
  done
}

browser=$(find_browser || true)
driver=$(command -v chromedriver || true)
if [ -z "$browser" ] || [ -z "$driver" ]; then
  command -v apt-get >/dev/null 2>&1 ||
    fail "chromium and chromedriver are missing and apt-get is not available to install Debian's 'chromium' and 'chromium-driver' packages"
  echo "installing Debian's chromium and chromium-driver packages (first run only)" >&2
  start=$SECONDS
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  if ! { $sudo apt-get update -qq >&2 &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver >/dev/null; }; then
    fail "could not install the browser: 'apt-get install chromium chromium-driver' failed"
  fi
  echo "installed chromium and chromium-driver in $((SECONDS - start))s" >&2
  browser=$(find_browser || true)
  driver=$(command -v chromedriver || true)
  [ -n "$browser" ] && [ -n "$driver" ] || fail "chromium or chromedriver still missing after apt-get install"
fi

echo "BROWSER_BIN=$browser"
echo "CHROMEDRIVER_BIN=$driver"
