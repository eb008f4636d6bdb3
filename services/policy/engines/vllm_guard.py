"""Runs one vLLM server for the vLLM engine, and stops it when the engine's process is gone.

    <vLLM's python> vllm_guard.py <fd> <vLLM command...>

The engine starts this guard and keeps the write end of a pipe whose read end is ``fd`` here;
the guard starts the vLLM server in a process group of its own (vLLM's engine-core processes
join it). However the engine's process ends (a clean stop, an exception, SIGKILL), the kernel
closes that write end: the read below returns and the guard ends vLLM's group, SIGTERM first,
SIGKILL after a grace period. So no vLLM process outlives the process that started it.

SIGTERM or SIGINT to the guard (the engine's ``unload`` and ``stop``) ends the group the same
way; when the server exits, whatever it left in its group is killed and the guard exits with
the server's status (128 + N when signal N ended it). Standard library only: it runs on
vLLM's Python, not the project's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

GRACE_S = 20.0  # under the engine's 30 s wait for the guard


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: vllm_guard.py <fd> <command...>", file=sys.stderr)
        return 2
    fd, command = int(argv[0]), argv[1:]
    ending = threading.Event()
    started: list[int] = []  # the server's pid (its process group's id) once it runs

    def stop() -> None:
        _kill_group(started[0], signal.SIGTERM)
        timer = threading.Timer(GRACE_S, _kill_group, (started[0], signal.SIGKILL))
        timer.daemon = True
        timer.start()

    def end(*_: object) -> None:
        if not ending.is_set():
            ending.set()
            if started:
                stop()

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 64):
                pass
        end()  # end of file: the engine's process is gone

    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, end)
    threading.Thread(target=watch, daemon=True).start()
    server = subprocess.Popen(command, process_group=0)
    started.append(server.pid)
    if ending.is_set():  # asked to end while the server was starting
        stop()
    status = server.wait()
    _kill_group(server.pid, signal.SIGKILL)  # its engine core, if it outlived the server
    return 128 - status if status < 0 else status  # killed by signal N: 128 + N, as shells do


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
