"""The README's serving steps, run as written: its bash block (model init, local broker, seed,
both servers), then its Python client example against the servers it started.

The block uses the default ports (Kafka 9092, gRPC 50051/50052, metrics 9101/9102), which
other processes on a shared machine may hold, so it runs in a network namespace of its own
(``unshare --net``) where they are free. Where namespaces are not allowed, the same commands
run with those ports moved to free ones (the only edit), and the test says so in its output.
Each ``bin/rlhf serve`` line is started in the background, as one would in its own terminal.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

from rlhf.kafka_local import free_port

ROOT = Path(__file__).resolve().parents[1]
LINKED = ("bin", "scripts", "rlhf", "services", "trainer", "data", "requirements.lock",
          "pyproject.toml")  # fmt: skip
DEFAULT_PORTS = {"9092": "kafka", "9093": "controller", "50051": "policy", "50052": "reward",
                 "9101": "policy metrics", "9102": "reward metrics"}  # fmt: skip


def readme_blocks(heading: str, python_holding: str = "") -> tuple[str, str]:
    """The first bash block of the README section under ``heading``, and its first python
    block that contains ``python_holding``."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", section, re.S)
    pythons = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if python_holding in b]
    assert bash and pythons, f"README section {heading!r} lost its examples"
    return bash.group(1), pythons[0]


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined; serve commands backgrounded."""
    joined = block.replace("\\\n", " ")
    out = []
    for i, line in enumerate(joined.splitlines()):
        line = line.split("  #", 1)[0].strip()
        if not line:
            continue
        if line.startswith("bin/rlhf serve "):
            line = f"{line} > serve-{i}.log 2>&1 &"
        out.append(line)
    return out


WAIT = textwrap.dedent(
    """
    import sys, time, grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    for port, service in ((sys.argv[1], "rlhf.v1.InferenceService"),
                          (sys.argv[2], "rlhf.v1.RewardService")):
        deadline = time.monotonic() + 240
        while True:
            try:
                with grpc.insecure_channel(f"localhost:{port}") as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"{service} on {port} never served")
            time.sleep(0.5)
    """
)


def namespaces_allowed() -> bool:
    try:
        return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def test_the_readme_serving_block_runs_as_written(tmp_path: Path) -> None:
    bash, python = readme_blocks(
        "Serving: policy and reward servers", 'grpc.insecure_channel("localhost:50051")'
    )
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "client.py").write_text(python)
    (tmp_path / "wait.py").write_text(WAIT)
    isolated = namespaces_allowed()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_") or k == "RLHF_CACHE"}
    ports = {"50051": "50051", "50052": "50052"}
    script = commands(bash)
    if not isolated:
        moved = {port: str(free_port()) for port in DEFAULT_PORTS}
        ports = {p: moved[p] for p in ports}
        script = [re.sub(r"\b(9092|9093|50051|50052|9101|9102)\b", lambda m: moved[m[1]], c)
                  for c in script]  # fmt: skip
        env.update(
            RLHF_KAFKA_PORT=moved["9092"], RLHF_KAFKA_CONTROLLER_PORT=moved["9093"],
            RLHF_POLICY_RUNTIME__PORT=moved["50051"], RLHF_REWARD_RUNTIME__PORT=moved["50052"],
            RLHF_POLICY_RUNTIME__METRICS_PORT=moved["9101"],
            RLHF_REWARD_RUNTIME__METRICS_PORT=moved["9102"],
        )  # fmt: skip
        client = python
        for port in ("50051", "50052"):
            client = client.replace(f"localhost:{port}", f"localhost:{moved[port]}")
        (tmp_path / "client.py").write_text(client)
        print("network namespaces not allowed here: ports moved to", moved)
    driver = "\n".join([
        "set -euo pipefail",
        *(["ip link set lo up"] if isolated else []),
        "trap 'kill $(jobs -p) 2>/dev/null; wait; bin/rlhf kafka stop' EXIT",
        *script,
        'venv=$(scripts/bootstrap.sh)',
        f'PYTHONPATH=$PWD "$venv/bin/python" wait.py {ports["50051"]} {ports["50052"]}',
        'PYTHONPATH=$PWD "$venv/bin/python" client.py',
    ])  # fmt: skip
    (tmp_path / "driver.sh").write_text(driver + "\n")
    argv = ["bash", "driver.sh"]
    if isolated:
        argv = ["unshare", "--net", *argv]
    proc = subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    logs = "".join(
        f"\n--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(tmp_path.glob("*.log"))
    )
    assert proc.returncode == 0, (
        f"{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
        f"{proc.stderr[-4000:]}{logs}"
    )
    # The client printed the policy's version, its samples and the reward model's scores.
    out = proc.stdout
    assert re.search(r"^policy-\d{6}-[0-9a-f]{8} \d+$", out, re.M), out
    assert "FINISH_REASON_" in out, out
    assert re.search(r"reward-\d{6}-[0-9a-f]{8}", out), out
