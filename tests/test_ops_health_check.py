"""The `helm test` health check (helm/rlhf/files/health_check.py) against real servers: the
server runtime every component runs on, and plain gRPC health servers whose status the test
controls."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, start_http_server

from rlhf.http import HttpDoor, Style
from rlhf.kafka_local import free_port
from rlhf.runtime import RuntimeConfig, Scope, ServerRuntime

SCRIPT = Path(__file__).resolve().parents[1] / "helm" / "rlhf" / "files" / "health_check.py"


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


class WatchedHealth(health.HealthServicer):
    """Signals when a client starts watching, so the test can change the status afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.watching = threading.Event()

    def Watch(self, request, context, send_response_callback=None):
        self.watching.set()
        return super().Watch(request, context, send_response_callback)


@pytest.fixture
def health_server() -> Iterator[tuple[WatchedHealth, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = WatchedHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def test_passes_against_the_server_runtime() -> None:
    """A real component server (rlhf/runtime.py): health per service, /metrics with rlhf_ metrics,
    and API keys on, which the health service must not require."""
    config = RuntimeConfig(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        http_host="127.0.0.1",
        http_port=0,
        api_keys="k1 infer",
    )
    runtime = ServerRuntime(config, CollectorRegistry(), component="policy")

    def add(server: object) -> None:
        HttpDoor(runtime, style=Style.GOOGLE).health("/health", ["rlhf.v1.InferenceService"])

    runtime.start_in_thread(add, {"rlhf.v1.InferenceService": Scope.INFER})
    try:
        done = run_check(
            "--grpc",
            f"127.0.0.1:{runtime.port}/rlhf.v1.InferenceService",
            "--grpc",
            f"127.0.0.1:{runtime.port}",
            "--http",
            f"http://127.0.0.1:{runtime.http_port}/health",
            "--metrics",
            f"http://127.0.0.1:{runtime.metrics_port}/metrics",
            "--timeout-s",
            "10",
        )
        runtime.set_ready("rlhf.v1.InferenceService", False)
        down = run_check(
            "--http", f"http://127.0.0.1:{runtime.http_port}/health", "--timeout-s", "1"
        )
    finally:
        runtime.stop_in_thread()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "health checks: 4 of 4 ok"
    assert down.returncode == 1 and "not healthy after 1s (HTTP 503)" in down.stdout, down.stdout


def test_waits_for_a_server_that_becomes_ready(health_server: tuple[WatchedHealth, int]) -> None:
    servicer, port = health_server
    servicer.set("rlhf.v1.RewardService", health_pb2.HealthCheckResponse.NOT_SERVING)
    check = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--grpc", f"127.0.0.1:{port}/rlhf.v1.RewardService"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert servicer.watching.wait(30), "the check never started watching"
        servicer.set("rlhf.v1.RewardService", health_pb2.HealthCheckResponse.SERVING)
        out, _ = check.communicate(timeout=30)
    finally:
        check.kill()
    assert check.returncode == 0, out
    assert out.startswith("ok   grpc 127.0.0.1:"), out


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (health_pb2.HealthCheckResponse.NOT_SERVING, "(NOT_SERVING)"),
        (None, "(SERVICE_UNKNOWN)"),
    ],
)
def test_fails_when_not_serving(
    health_server: tuple[WatchedHealth, int],
    status: health_pb2.HealthCheckResponse.ServingStatus | None,
    reason: str,
) -> None:
    servicer, port = health_server
    if status is not None:
        servicer.set("rlhf.v1.FeedbackService", status)
    done = run_check("--grpc", f"127.0.0.1:{port}/rlhf.v1.FeedbackService", "--timeout-s", "1")
    assert done.returncode == 1
    assert f"not SERVING after 1s {reason}" in done.stdout, done.stdout


def test_fails_without_a_server() -> None:
    done = run_check("--grpc", f"127.0.0.1:{free_port()}", "--timeout-s", "1")
    assert done.returncode == 1
    assert "not SERVING after 1s (no status received)" in done.stdout, done.stdout


def test_metrics_must_be_prometheus_text_with_rlhf_metrics() -> None:
    registry = CollectorRegistry()
    Counter("other_events_total", "not ours", registry=registry).inc()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    port = server.server_port
    try:
        missing = run_check("--metrics", f"http://127.0.0.1:{port}/metrics")
        Counter("rlhf_opstest_events_total", "ours", registry=registry).inc()
        present = run_check("--metrics", f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert missing.returncode == 1
    assert "no rlhf_ metrics among" in missing.stdout, missing.stdout
    assert present.returncode == 0, present.stdout
    refused = run_check("--metrics", f"http://127.0.0.1:{free_port()}/metrics")
    assert refused.returncode == 1
    assert "GET failed" in refused.stdout
