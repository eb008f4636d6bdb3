"""The README's first command end to end: `rlhf demo` on the tiny model for a short while.

Real Kafka, the four components as processes, the simulated labeler over gRPC. At least one
trained policy version must be published, promoted and serve responses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_publishes_promotes_and_serves_a_trained_policy(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf", "demo", "--duration-s", "75", "--workdir",
         str(tmp_path / "demo"), "--summary-every-s", "15", "--require-new-version", "true"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])["demo"]
    initial = report["initial_version"]
    trained = [v for v in report["served_versions"] if v != initial]
    assert trained, report
    assert report["promoted"] != initial and report["promoted"] in report["policy_versions"]
    assert report["rankings"] > 0 and report["demonstrations"] > 0
    assert report["client_errors"] == 0
    # Every process was stopped: nothing of the demo keeps running.
    assert "requests served" in proc.stdout
