"""Runs every benchmark under bench/ and prints each one's closing JSON line.

Each benchmark measures its own baseline in the same run and prints, as its last line, one
JSON object with its figures; this collects those lines (``make bench``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = 0
    results = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        proc = subprocess.run(
            [sys.executable, str(script), *sys.argv[1:]],
            env={**os.environ, "PYTHONPATH": str(HERE.parent)},
            capture_output=True,
            text=True,
            check=False,
        )
        lines = proc.stdout.strip().splitlines()
        try:
            results.append(json.loads(lines[-1]))
            print(lines[-1], flush=True)
        except (IndexError, json.JSONDecodeError):
            failed += 1
            print(
                f"{script.name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True
            )
    print(json.dumps({"bench": "all", "results": results, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
