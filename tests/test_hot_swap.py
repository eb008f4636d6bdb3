"""Hot swap end to end: real Kafka, a real policy server over gRPC, real checkpoints.

Versions are published the way the trainer publishes them (immutable checkpoint, then
PUBLISHED and PROMOTED model events); the server follows the models topic, loads each new
version beside the old one and swaps without failing a request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from rlhf import bus, checkpoint, models, topics
from rlhf.config import load_config
from rlhf.lifecycle import published_events
from rlhf.seed import seed_registry
from rlhf.v1 import admin_pb2, admin_pb2_grpc, events_pb2, inference_pb2, inference_pb2_grpc
from services.policy.config import PolicyServerConfig
from services.policy.server import PolicyServer

POLICY = events_pb2.MODEL_ROLE_POLICY


@pytest.fixture(scope="module", params=["byte", "bpe"])
def model_dirs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """Four tiny policies of one model family with different weights (seeds 0..3): every
    test here runs on the byte family and on the BPE chat family."""
    root = tmp_path_factory.mktemp(f"models-{request.param}")
    dirs = []
    for seed in range(4):
        out = root / f"m{seed}"
        models.init_models(models.InitConfig(out=str(out), seed=seed, tokenizer=request.param))
        dirs.append(out)
    return dirs


def publish(registry: Path, source: Path, producer: bus.Producer, parent: str) -> tuple[str, str]:
    """Publishes like the trainer; returns the version and its PROMOTED event's id."""
    manifest = checkpoint.publish(
        registry, "policy", source / "policy", round_type="ppo", parent=parent, metrics={},
        offsets={},
    )  # fmt: skip
    path = registry / "policy" / manifest.version
    events = published_events(manifest, path, auto_promote=True, actor="test")
    for event in events:
        producer.send_sync(topics.MODELS, event, key=event.event_id)
    return manifest.version, events[-1].event_id


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def start_server(registry: Path, bootstrap: str) -> PolicyServer:
    config = load_config(
        PolicyServerConfig,
        flags={
            "model.registry": str(registry),
            "follow.bootstrap_servers": bootstrap,
            "runtime.host": "127.0.0.1",
            "runtime.port": "0",
            "runtime.metrics_port": "-1",
            "runtime.http_port": "-1",
            "runtime.grace_s": "5",
        },
    )
    server = PolicyServer(config, CollectorRegistry())
    server.start_in_thread()
    return server


@dataclass
class Outcome:
    started: float
    versions: set[str]
    error: str = ""


def stream_clients(
    port: int, n: int, stop: threading.Event, out: list[Outcome]
) -> list[threading.Thread]:
    lock = threading.Lock()

    def client(i: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            while not stop.is_set():
                started = time.monotonic()
                request = inference_pb2.GenerateRequest(
                    prompt=f"client {i}: café, 你好", user_id=f"u{i}",
                    parameters=inference_pb2.GenerationParameters(max_new_tokens=6, do_sample=True, seed=i),
                )  # fmt: skip
                result = Outcome(started, set())
                streamed, final = "", None
                try:
                    for event in stub.GenerateStream(request, timeout=60):
                        result.versions.add(event.model_version)
                        streamed += event.token.text
                        if event.HasField("finished"):
                            final = event.finished.text
                    if streamed != final:
                        result.error = f"streamed {streamed!r} but finished {final!r}"
                except grpc.RpcError as exc:
                    result.error = f"{exc.code().name}: {exc.details()}"
                with lock:
                    out.append(result)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_three_publishes_under_streaming_load_fail_no_request(private_kafka, model_dirs, tmp_path):
    registry = tmp_path / "registry"
    producer = bus.Producer(private_kafka.bootstrap_servers, client_id="swap-test")
    (first,) = [
        m.version for m in seed_registry(registry, model_dirs[0], producer) if m.role == "policy"
    ]
    server = start_server(registry, private_kafka.bootstrap_servers)
    stop = threading.Event()
    outcomes: list[Outcome] = []
    threads = stream_clients(server.runtime.port, 16, stop, outcomes)
    swapped: list[tuple[str, float]] = [(first, 0.0)]
    try:
        for source in model_dirs[1:]:
            # Traffic on the current version first: a swap happens under load.
            seen = len(outcomes)
            wait_until(lambda seen=seen: len(outcomes) >= seen + 20)
            version, _ = publish(registry, source, producer, parent=swapped[-1][0])
            assert server.pool.wait_resident(version, 60), f"{version} did not load"
            swapped.append((version, time.monotonic()))
        seen = len(outcomes)
        wait_until(lambda: len(outcomes) >= seen + 40)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        # Old versions were released after their last request; the promoted one stays.
        assert server.pool.resident() == [swapped[-1][0]]
    finally:
        stop.set()
        server.stop_in_thread()
        producer.close()

    assert len(outcomes) > 50
    errors = [o.error for o in outcomes if o.error]
    assert errors == [], errors[:5]
    assert all(len(o.versions) == 1 and "" not in o.versions for o in outcomes), (
        "every response carries one version"
    )
    served = {v for o in outcomes for v in o.versions}
    assert served == {v for v, _ in swapped}
    # A request that started after a swap completed runs on that version (or a later one).
    order = {v: i for i, (v, _) in enumerate(swapped)}
    for version, done_at in swapped[1:]:
        later = [o for o in outcomes if o.started > done_at + 0.05]
        assert later, f"no request started after {version} took over"
        assert all(order[next(iter(o.versions))] >= order[version] for o in later)


def admin(port: int) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def generate(port: int, user: str = "u") -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        reply = stub.Generate(
            inference_pb2.GenerateRequest(
                prompt="hi",
                user_id=user,
                parameters=inference_pb2.GenerationParameters(max_new_tokens=2),
            ),
            timeout=30,
        )
    return reply.model_version


def test_rollback_pin_corruption_and_a_late_server(private_kafka, model_dirs, tmp_path):
    registry = tmp_path / "registry"
    bs = private_kafka.bootstrap_servers
    producer = bus.Producer(bs, client_id="swap-test-2")
    (v1,) = [
        m.version for m in seed_registry(registry, model_dirs[0], producer) if m.role == "policy"
    ]
    server = start_server(registry, bs)
    port = server.runtime.port
    late: PolicyServer | None = None
    try:
        v2, _ = publish(registry, model_dirs[1], producer, parent=v1)
        assert server.pool.wait_resident(v2, 60)
        assert generate(port) == v2

        # Roll back: every new request goes to v1 again.
        ack = admin(port).Rollback(admin_pb2.RollbackRequest(role=POLICY), timeout=30)
        assert ack.status.serving_version == v1
        assert server.pool.wait_resident(v1, 60)
        assert {generate(port, f"user{i}") for i in range(5)} == {v1}

        # Pin v1: a later publish (v3, promoted) does not move it.
        admin(port).Pin(admin_pb2.PinRequest(role=POLICY, version=v1), timeout=30)
        v3, promoted = publish(registry, model_dirs[2], producer, parent=v2)
        assert server.models.follower is not None
        assert server.models.follower.wait_for(promoted, 30)
        assert server.models.follower.states[POLICY].promoted == v3
        assert {generate(port, f"user{i}") for i in range(5)} == {v1}
        admin(port).Pin(admin_pb2.PinRequest(role=POLICY), timeout=30)  # unpin
        assert server.pool.wait_resident(v3, 60)
        assert generate(port) == v3

        # A corrupted checkpoint (one flipped byte) is rejected; serving goes on with v3.
        manifest = checkpoint.publish(
            registry, "policy", model_dirs[3] / "policy", round_type="ppo", parent=v3,
            metrics={}, offsets={},
        )  # fmt: skip
        weights = registry / "policy" / manifest.version / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.chmod(0o644)
        weights.write_bytes(bytes(data))
        for event in published_events(manifest, weights.parent, auto_promote=True, actor="test"):
            producer.send_sync(topics.MODELS, event, key=event.event_id)
        assert not server.pool.wait_resident(manifest.version, 60)
        assert "checksum" in server.pool.rejected()[manifest.version]
        assert {generate(port, f"user{i}") for i in range(5)} == {v3}

        # A server started now replays the history and serves the promoted, loadable version.
        admin(port).Rollback(admin_pb2.RollbackRequest(role=POLICY, version=v3), timeout=30)
        late = start_server(registry, bs)
        assert late.models.follower is not None
        assert late.models.follower.states[POLICY].promoted == v3
        assert generate(late.runtime.port) == v3
    finally:
        if late is not None:
            late.stop_in_thread()
        server.stop_in_thread()
        producer.close()
