"""The vLLM engine starts each vLLM server under a guard (services/policy/engines/vllm_guard.py):
no server outlives the process that started it, however that process ends, and stopping the
guard stops the server. Runs without vLLM: the guarded command here is a plain Python sleeper,
started by the engine's own ``start_guarded``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.policy.engines.vllm import start_guarded

ROOT = Path(__file__).resolve().parents[1]

SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"

# A process that starts a guarded sleeper and then waits to be killed.
PARENT = f"""
import os, sys, time
from pathlib import Path
from services.policy.engines.vllm import start_guarded
command = [sys.executable, "-c", {SLEEPER!r}, sys.argv[1]]
guard, lifeline = start_guarded(command, Path(sys.argv[2]), dict(os.environ))
print(guard.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def server_pid(pid_file: Path) -> int:
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60)
    return int(pid_file.read_text())


def test_the_server_ends_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(pid_file), str(tmp_path / "guard.log")],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert parent.stdout is not None
        guard = int(parent.stdout.readline())
        server = server_pid(pid_file)
        assert not gone(server)
        parent.kill()  # SIGKILL: nothing of the parent's own code runs
        parent.wait(30)
        assert wait_for(lambda: gone(server), 30), "the guarded server outlived its starter"
        assert wait_for(lambda: gone(guard), 30)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_sigterm_to_the_guard_stops_the_server(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    command = [sys.executable, "-c", SLEEPER, str(pid_file)]
    guard, lifeline = start_guarded(command, tmp_path / "guard.log", dict(os.environ))
    try:
        server = server_pid(pid_file)
        guard.send_signal(signal.SIGTERM)
        assert guard.wait(30) == 128 + signal.SIGTERM  # the server's status: ended by SIGTERM
        assert wait_for(lambda: gone(server), 30)
    finally:
        lifeline.close()
        if guard.poll() is None:
            guard.kill()
