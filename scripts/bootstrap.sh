#!/usr/bin/env bash
# Makes sure the Python environment for this checkout exists and prints its path.
#
# The virtualenv lives outside the clone, under $RLHF_CACHE (default ~/.cache/rlhf), keyed
# by the hash of requirements.lock: PyPI's torch is a multi-GB CUDA build, so every clone
# and every CI run with the same lock reuses one environment instead of downloading again.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${RLHF_CACHE:-$HOME/.cache/rlhf}
py=${PYTHON:-python3}

if ! command -v "$py" >/dev/null 2>&1; then
  echo "error: $py not found; install Python 3.11" >&2
  exit 1
fi
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: Python 3.11 is required, $py is $("$py" --version 2>&1)" >&2
  exit 1
fi

key=$(sha256sum "$root/requirements.lock" | cut -c1-16)
venv="$cache/venv-$key"
mkdir -p "$cache"
# One builder at a time: parallel runs (make targets, CI next to a shell) wait for it.
exec 9>"$cache/.venv-$key.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "setting up the Python environment in $venv (first run only)" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/requirements.lock" >&2
  touch "$venv/.complete"
fi
echo "$venv"
