#!/usr/bin/env bash
# Regenerates the protobuf/gRPC Python code and type stubs in rlhf/v1 from protos/.
# With --check, regenerates into a temporary tree and fails if the committed code differs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/scripts/bootstrap.sh")
out="$root"
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/rlhf/v1"
cd "$root/protos"
PATH="$venv/bin:$PATH" "$venv/bin/python" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" --mypy_out=quiet:"$out" --mypy_grpc_out=quiet:"$out" \
  rlhf/v1/*.proto
[ -f "$out/rlhf/v1/__init__.py" ] || : > "$out/rlhf/v1/__init__.py"
if [ "${1:-}" = "--check" ]; then
  if ! diff -r -x __pycache__ "$out/rlhf/v1" "$root/rlhf/v1" >/dev/null; then
    diff -r -x __pycache__ "$out/rlhf/v1" "$root/rlhf/v1" | head -20 >&2
    echo "error: generated protobuf code in rlhf/v1 is stale; run 'make protos' and commit" >&2
    exit 1
  fi
  echo "generated protobuf code is up to date"
fi
