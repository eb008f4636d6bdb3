"""A real Prometheus scraping the real services: every metric the dashboard and the alert rules
use (dashboards/metrics.txt) is exposed by the running policy server, reward server, feedback
gateway and trainer, and the alert rules see every component up."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rlhf import models
from rlhf.kafka_local import LocalKafka, free_port
from rlhf.seed import seed_registry
from services.demo import Process, wait_serving
from tests.test_ops_prometheus import (  # noqa: F401  (fixtures)
    RULES,
    Prometheus,
    poll,
    prometheus,
    prometheus_binary,
)

ROOT = Path(__file__).resolve().parents[1]


def dashboard_metrics() -> set[str]:
    lines = (ROOT / "dashboards" / "metrics.txt").read_text().splitlines()
    return {line.split()[0] for line in lines if line.strip() and not line.startswith("#")}


def metrics_up(port: int, proc: Process, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc.check()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{proc.name} /metrics not up on {port}")


@pytest.fixture
def services(kafka: LocalKafka, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The four components as processes, the way `rlhf demo` and the chart run them."""
    base = tmp_path / "base"
    models.init_models(models.InitConfig(out=str(base)))
    registry = tmp_path / "registry"
    seed_registry(registry, base, producer=None)
    bs = kafka.bootstrap_servers
    logs = tmp_path / "logs"
    logs.mkdir()
    ports = {n: (free_port(), free_port(), free_port()) for n in ("policy", "reward", "feedback")}
    local = ["--runtime.host", "127.0.0.1", "--runtime.metrics-host", "127.0.0.1"]
    local += ["--runtime.http-host", "127.0.0.1"]
    prefix = f"scrape{free_port()}"
    procs = [
        Process("policy", ["serve", "policy", "--model.registry", str(registry),
                           "--follow.bootstrap-servers", bs, "--publish.bootstrap-servers", bs,
                           "--runtime.port", str(ports["policy"][0]),
                           "--runtime.metrics-port", str(ports["policy"][1]),
                           "--runtime.http-port", str(ports["policy"][2]), *local], logs),
        Process("reward", ["serve", "reward", "--model.registry", str(registry),
                           "--runtime.port", str(ports["reward"][0]),
                           "--runtime.metrics-port", str(ports["reward"][1]),
                           "--runtime.http-port", str(ports["reward"][2]), *local], logs),
        Process("feedback", ["serve", "feedback", "--kafka.bootstrap-servers", bs,
                             "--runtime.port", str(ports["feedback"][0]),
                             "--runtime.metrics-port", str(ports["feedback"][1]),
                             "--runtime.http-port", str(ports["feedback"][2]), *local], logs),
        Process("trainer", ["train", "--bootstrap-servers", bs, "--registry", str(registry),
                            "--base-model", str(base), "--streams.topic-prefix", prefix,
                            "--group-id", prefix, "--progress", "off", "--device", "cpu",
                            "--metrics-port", str(trainer_port := free_port())], logs),
    ]  # fmt: skip
    try:
        for proc, service in zip(
            procs[:3], ("rlhf.v1.InferenceService", "rlhf.v1.RewardService", "rlhf.v1.FeedbackService"),
            strict=True,
        ):  # fmt: skip
            wait_serving(f"127.0.0.1:{ports[proc.name][0]}", service, proc)
            # One call through each server's HTTP door, so its metrics carry protocol="http".
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[proc.name][2]}/health") as r:
                assert r.status == 200
        metrics_up(trainer_port, procs[3])
        yield {
            "policy": f"127.0.0.1:{ports['policy'][1]}",
            "reward": f"127.0.0.1:{ports['reward'][1]}",
            "feedback": f"127.0.0.1:{ports['feedback'][1]}",
            "trainer": f"127.0.0.1:{trainer_port}",
        }
    finally:
        for proc in procs:
            proc.stop()


def test_every_dashboard_and_alert_metric_is_exposed_by_the_running_services(
    services: dict[str, str],
    prometheus: Callable[..., Prometheus],  # noqa: F811 (the imported fixture)
) -> None:
    server = prometheus({name: [target] for name, target in services.items()}, rule_files=[RULES])
    up = server.wait_for("up == 1", lambda r: len(r) == 4, timeout_s=60)
    assert {s["metric"]["rlhf_component"] for s in up} == set(services)
    # A metric from each component through the query API; the servers' calls by protocol.
    for component in services:
        assert server.wait_for(f'{{__name__=~"rlhf_{component}_.*", rlhf_component="{component}"}}')
    for component in ("policy", "reward", "feedback"):
        [http] = server.wait_for(
            f'sum by (protocol, method, code) (rlhf_{component}_requests_total{{protocol="http"}})'
        )
        assert http["metric"] == {"protocol": "http", "method": "/health", "code": "OK"}
    wanted = dashboard_metrics()
    declared = poll(
        server.metadata, lambda m: wanted <= set(m), 60, what="metadata of the running services"
    )
    missing = sorted(wanted - set(declared))
    assert missing == [], f"used by the dashboard/alerts but exposed by no service: {missing}"
