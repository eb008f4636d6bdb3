"""A policy server restarted while a rejected version is promoted comes up serving the last
good version the model events allow: it loads nothing else, rejects nothing again, adopts no
corrupt version from the registry, and health says SERVING only once it can serve."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from rlhf import bus, checkpoint, models, topics
from rlhf.config import load_config
from rlhf.lifecycle import Kind
from rlhf.seed import seed_registry
from rlhf.v1 import admin_pb2, admin_pb2_grpc, events_pb2, inference_pb2, inference_pb2_grpc
from services.policy.config import PolicyServerConfig
from services.policy.server import PolicyServer
from tests.test_feedback_gateway import read_events

POLICY = events_pb2.MODEL_ROLE_POLICY
INFERENCE = "rlhf.v1.InferenceService"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("models")
    for seed in range(3):
        models.init_models(models.InitConfig(out=str(root / f"m{seed}"), seed=seed))
    return [root / f"m{seed}" for seed in range(3)]


def corrupt(version_dir: Path) -> None:
    with (version_dir / "model.safetensors").open("r+b") as f:
        f.seek(64)
        f.write(b"\xff" * 16)


def server(registry: Path, bootstrap: str) -> PolicyServer:
    config = load_config(
        PolicyServerConfig,
        flags={
            "model.registry": str(registry),
            "follow.bootstrap_servers": bootstrap,
            "runtime.host": "127.0.0.1",
            "runtime.port": "0",
            "runtime.metrics_port": "-1",
            "runtime.http_port": "-1",
            "runtime.grace_s": "1",
        },
    )
    return PolicyServer(config, CollectorRegistry())


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=INFERENCE)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def generate(port: int) -> inference_pb2.GenerateResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(
            prompt="hello", parameters=inference_pb2.GenerationParameters(max_new_tokens=2)
        )
        return stub.Generate(request, timeout=30)


def rejections(bootstrap: str) -> list[str]:
    return [
        r.value.version  # type: ignore[attr-defined]
        for r in read_events(bootstrap, [topics.MODELS])
        if r.value.kind == Kind.MODEL_EVENT_KIND_REJECTED  # type: ignore[attr-defined]
    ]


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_restart_with_a_rejected_version_promoted_serves_the_last_good_one(
    private_kafka, model_dirs, tmp_path
) -> None:
    bootstrap = private_kafka.bootstrap_servers
    registry = tmp_path / "registry"
    producer = bus.Producer(bootstrap, client_id="restart-test")
    try:
        (good,) = [m.version for m in seed_registry(registry, model_dirs[0], producer)
                   if m.role == "policy"]  # fmt: skip
        first = server(registry, bootstrap)
        first.start_in_thread()
        try:
            # v2: published and promoted, then found corrupt by the server: rejected.
            manifest = checkpoint.publish(
                registry, "policy", model_dirs[1] / "policy", round_type="ppo", parent=good,
                metrics={}, offsets={},
            )  # fmt: skip
            bad = manifest.version
            corrupt(registry / "policy" / bad)
            for event in publish_events(registry, bad):
                producer.send_sync(topics.MODELS, event, key=event.event_id)
            wait_until(lambda: bad in first.pool.rejected())
            assert generate(first.runtime.port).model_version == good
        finally:
            first.stop_in_thread()
        wait_until(lambda: rejections(bootstrap) == [bad])

        # v3: in the registry, corrupt, and never announced by any event.
        unannounced = checkpoint.publish(
            registry, "policy", model_dirs[2] / "policy", round_type="ppo", parent=bad,
            metrics={}, offsets={},
        ).version  # fmt: skip
        corrupt(registry / "policy" / unannounced)

        second = server(registry, bootstrap)
        second.start_in_thread()
        try:
            port = second.runtime.port
            assert health(port) == health_pb2.HealthCheckResponse.SERVING
            assert generate(port).model_version == good
            assert second.pool.resident() == [good]
            assert second.pool.rejected() == {}  # nothing was loaded only to be rejected
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                admin = admin_pb2_grpc.AdminServiceStub(channel)
                listed = {
                    v.version: v
                    for v in admin.ListVersions(
                        admin_pb2.ListVersionsRequest(role=POLICY), timeout=10
                    ).versions
                }
                status = admin.GetStatus(admin_pb2.StatusRequest(), timeout=10)
                with pytest.raises(grpc.RpcError) as err:
                    admin.Promote(admin_pb2.PromoteRequest(role=POLICY, version=bad), timeout=10)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert unannounced not in listed
            assert listed[bad].rejected_reason and not listed[bad].promoted
            assert listed[good].promoted and listed[good].round_type == "init"
            assert listed[bad].round_type == "ppo"
            assert [r.serving_version for r in status.roles if r.role == POLICY] == [good]
        finally:
            second.stop_in_thread()
        assert rejections(bootstrap) == [bad]  # not rejected again
    finally:
        producer.close()


def publish_events(registry: Path, version: str) -> list[events_pb2.ModelEvent]:
    from rlhf.lifecycle import published_events

    path = registry / "policy" / version
    return published_events(checkpoint.read_manifest(path), path, auto_promote=True, actor="test")


def test_health_is_not_serving_while_every_version_is_rejected(
    private_kafka, model_dirs, tmp_path
) -> None:
    bootstrap = private_kafka.bootstrap_servers
    registry = tmp_path / "registry"
    producer = bus.Producer(bootstrap, client_id="reject-all-test")
    try:
        seed_registry(registry, model_dirs[0], producer)
        only = checkpoint.latest(registry, "policy")
        assert only is not None
        corrupt(only)
        srv = server(registry, bootstrap)
        srv.runtime.start_in_thread(srv.add_servicers, srv.services)
        try:
            wait_until(lambda: only.name in srv.pool.rejected())
            assert health(srv.runtime.port) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                generate(srv.runtime.port)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert srv.runtime.failing(INFERENCE).keys() == {"model"}
        finally:
            srv.stop_in_thread()
    finally:
        producer.close()
