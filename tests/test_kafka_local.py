"""The local broker command: clear errors when tools are missing or the broker won't start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import kafka_local
from rlhf.kafka_local import KafkaSetupError, LocalKafka, free_port

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlhf", "kafka", *args],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("missing", ["java", "mvn"])
def test_missing_tool_gives_a_one_line_error_naming_what_to_install(tmp_path, missing):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in {"java", "mvn"} - {missing}:
        real = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        (bin_dir / tool).symlink_to(real)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "RLHF_CACHE": str(tmp_path / "cache")}
    proc = run_cli(["start", "--data-dir", str(tmp_path / "k"), "--port", str(free_port()),
                    "--controller-port", str(free_port())], env)  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith(f"error: {missing} not found: install ")


def test_broker_that_does_not_come_up_in_time_fails_with_its_log_lines(tmp_path):
    broker = LocalKafka(tmp_path / "k", port=free_port(), controller_port=free_port())
    with pytest.raises(KafkaSetupError, match="not serving after 0s") as info:
        broker.start(timeout_s=0.01)
    # The broker's own log lines come with the error, and nothing is left running.
    assert "\n" in str(info.value)
    assert not broker.is_running()


def test_start_refuses_a_port_that_is_taken(kafka, tmp_path):
    broker = LocalKafka(tmp_path / "k", port=kafka.port, controller_port=free_port())
    with pytest.raises(KafkaSetupError, match=f"port {kafka.port} is already in use"):
        broker.start()


def test_cli_start_status_stop(tmp_path):
    env = dict(os.environ)
    args = ["--data-dir", str(tmp_path / "k"), "--port", str(free_port()),
            "--controller-port", str(free_port())]  # fmt: skip
    started = run_cli(["start", *args], env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"kafka {kafka_local.KAFKA_VERSION} serving on" in started.stdout
    try:
        assert run_cli(["status", *args], env).returncode == 0
    finally:
        stopped = run_cli(["stop", *args], env)
    assert stopped.returncode == 0
    status = run_cli(["status", *args], env)
    assert status.returncode == 3 and "stopped" in status.stdout
