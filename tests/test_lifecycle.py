"""Model lifecycle: serving state folded from model events, and AdminService over real gRPC + Kafka."""

from __future__ import annotations

import uuid

import grpc
import pytest
from prometheus_client import CollectorRegistry

from rlhf import bus, topics
from rlhf.lifecycle import Kind, ModelFollower, ModelState, model_event, user_bucket
from rlhf.runtime import RuntimeConfig, Scope, ServerRuntime
from rlhf.v1 import admin_pb2, admin_pb2_grpc, events_pb2
from services.admin.service import AdminServicer

POLICY = events_pb2.MODEL_ROLE_POLICY
REWARD = events_pb2.MODEL_ROLE_REWARD


def published(version: str, role: int = POLICY) -> events_pb2.ModelEvent:
    return model_event(Kind.MODEL_EVENT_KIND_PUBLISHED, role, version, path=f"/r/{version}")


def fold(*events: events_pb2.ModelEvent, role: int = POLICY) -> ModelState:
    state = ModelState(role)
    for e in events:
        state.apply(e)
    return state


def test_promote_rollback_pin_and_unknown_versions():
    v1, v2, v3 = "policy-000001-aaaaaaaa", "policy-000002-bbbbbbbb", "policy-000003-cccccccc"
    promote = lambda v: model_event(Kind.MODEL_EVENT_KIND_PROMOTED, POLICY, v)  # noqa: E731
    s = fold(published(v1), promote(v1), published(v2), promote(v2))
    assert s.route("anyone") == v2 and s.previous_promoted() == v1

    s.apply(model_event(Kind.MODEL_EVENT_KIND_ROLLED_BACK, POLICY, v1))
    assert s.promoted == v1 and s.route("u") == v1

    s.apply(model_event(Kind.MODEL_EVENT_KIND_PINNED, POLICY, v2))
    s.apply(published(v3))
    s.apply(promote(v3))
    assert s.promoted == v3 and s.route("u") == v2, "a pin survives later publishes"
    s.apply(model_event(Kind.MODEL_EVENT_KIND_UNPINNED, POLICY, ""))
    assert s.route("u") == v3

    # Events for versions never published, or for the other role, change nothing.
    assert not s.apply(promote("policy-000009-deadbeef"))
    assert not s.apply(published("reward-000001-aaaaaaaa", role=REWARD))
    assert s.promoted == v3 and set(s.versions) == {v1, v2, v3}


def test_canary_share_is_sticky_per_user_and_close_to_the_share():
    v1, v2 = "policy-000001-aaaaaaaa", "policy-000002-bbbbbbbb"
    s = fold(published(v1), model_event(Kind.MODEL_EVENT_KIND_PROMOTED, POLICY, v1), published(v2))
    s.apply(model_event(Kind.MODEL_EVENT_KIND_CANARY, POLICY, v2, canary_share=0.1))
    users = [f"user-{i}" for i in range(2000)]
    routed = [s.route(u) for u in users]
    share = routed.count(v2) / len(users)
    assert 0.07 < share < 0.13
    assert routed == [s.route(u) for u in users], "the same user always gets the same version"
    assert all((s.route(u) == v2) == (user_bucket(u) < 0.1) for u in users)
    # Promoting the candidate ends the canary.
    s.apply(model_event(Kind.MODEL_EVENT_KIND_PROMOTED, POLICY, v2))
    assert s.canary is None and {s.route(u) for u in users} == {v2}


@pytest.fixture
def admin_server(kafka, tmp_path):
    producer = bus.Producer(kafka.bootstrap_servers, client_id="admin-test")
    follower = ModelFollower(
        bootstrap_servers=kafka.bootstrap_servers,
        registry_dir=tmp_path,
        registry=CollectorRegistry(),
    )
    follower.start()
    runtime = ServerRuntime(
        RuntimeConfig(port=0, metrics_port=-1, api_keys="admin-key admin;infer-key infer"),
        CollectorRegistry(),
        component="admintest",
    )

    def add(server: grpc.aio.Server) -> None:
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(follower, producer), server)

    runtime.start_in_thread(add, {"rlhf.v1.AdminService": Scope.ADMIN})
    channel = grpc.insecure_channel(f"127.0.0.1:{runtime.port}")
    yield admin_pb2_grpc.AdminServiceStub(channel), producer, follower
    channel.close()
    runtime.stop_in_thread()
    follower.stop()
    producer.close()


ADMIN = [("authorization", "Bearer admin-key")]


def test_admin_changes_are_model_events_that_a_late_replica_replays(admin_server, kafka, tmp_path):
    stub, producer, follower = admin_server
    tag = uuid.uuid4().hex[:8]
    v1, v2 = f"policy-000001-{tag}", f"policy-000002-{tag}"
    for v in (v1, v2):
        ev = published(v)
        producer.send_sync(topics.MODELS, ev, key=ev.event_id)
        assert follower.wait_for(ev.event_id, 10)

    ack = stub.Promote(admin_pb2.PromoteRequest(role=POLICY, version=v1), metadata=ADMIN)
    assert ack.status.promoted_version == v1 and ack.event_id
    stub.Promote(admin_pb2.PromoteRequest(role=POLICY, version=v2), metadata=ADMIN)
    back = stub.Rollback(admin_pb2.RollbackRequest(role=POLICY), metadata=ADMIN)
    assert back.status.serving_version == v1
    canary = stub.SetCanary(
        admin_pb2.CanaryRequest(role=POLICY, version=v2, share=0.25), metadata=ADMIN
    )
    assert canary.status.canary_version == v2 and canary.status.canary_share == 0.25
    pin = stub.Pin(admin_pb2.PinRequest(role=POLICY, version=v2), metadata=ADMIN)
    assert pin.status.serving_version == v2 and pin.status.pinned_version == v2

    listed = stub.ListVersions(admin_pb2.ListVersionsRequest(role=POLICY), metadata=ADMIN)
    mine = {v.version: v for v in listed.versions if v.version in (v1, v2)}
    assert mine[v1].promoted and mine[v2].pinned and mine[v2].canary_share == 0.25

    # A replica started now reads the same history and reaches the same state.
    late = ModelFollower(bootstrap_servers=kafka.bootstrap_servers, registry_dir=tmp_path)
    late.start()
    try:
        a, b = follower.states[POLICY], late.states[POLICY]
        assert (b.promoted, b.pinned, b.canary, b.canary_share) == (v1, v2, v2, 0.25)
        assert (a.promoted, a.pinned, a.canary) == (b.promoted, b.pinned, b.canary)
    finally:
        late.stop()


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (lambda s, md: s.Promote(admin_pb2.PromoteRequest(role=POLICY, version="policy-999999-00000000"), metadata=md),
         grpc.StatusCode.NOT_FOUND, "is not a published policy version"),
        (lambda s, md: s.Promote(admin_pb2.PromoteRequest(role=POLICY), metadata=md),
         grpc.StatusCode.INVALID_ARGUMENT, "version is required"),
        (lambda s, md: s.SetCanary(admin_pb2.CanaryRequest(role=POLICY, version="x", share=1.5), metadata=md),
         grpc.StatusCode.INVALID_ARGUMENT, "share must be in [0, 1]"),
        (lambda s, md: s.GetStatus(admin_pb2.StatusRequest(), metadata=[("authorization", "Bearer infer-key")]),
         grpc.StatusCode.PERMISSION_DENIED, "admin"),
        (lambda s, md: s.GetStatus(admin_pb2.StatusRequest()),
         grpc.StatusCode.UNAUTHENTICATED, ""),
    ],
    ids=["unknown-version", "no-version", "bad-share", "wrong-scope", "no-key"],
)  # fmt: skip
def test_admin_rejects_bad_requests_with_clear_statuses(admin_server, call, code, message):
    stub, _, _ = admin_server
    with pytest.raises(grpc.RpcError) as info:
        call(stub, ADMIN)
    assert info.value.code() == code
    assert message in info.value.details()


def test_registry_versions_never_announced_are_adopted(tmp_path):
    """A checkpoint published while Kafka was down still reaches serving (registry fallback)."""
    from rlhf import checkpoint

    with checkpoint.staging(tmp_path) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        manifest = checkpoint.publish(tmp_path, "policy", tmp, round_type="sft", parent=None,
                                      metrics={}, offsets={})  # fmt: skip
    follower = ModelFollower(bootstrap_servers=None, registry_dir=tmp_path)
    follower.start()
    try:
        assert follower.states[POLICY].promoted == manifest.version
    finally:
        follower.stop()


def test_seed_publishes_and_promotes_the_base_models_once(kafka, tmp_path):
    from rlhf import models
    from rlhf.seed import seed_registry

    models.init_models(models.InitConfig(out=str(tmp_path / "base")))
    producer = bus.Producer(kafka.bootstrap_servers, client_id="seed-test")
    try:
        seeded = seed_registry(tmp_path / "registry", tmp_path / "base", producer)
    finally:
        producer.close()
    by_role = {m.role: m.version for m in seeded}
    assert set(by_role) == {"policy", "reward"}
    follower = ModelFollower(bootstrap_servers=kafka.bootstrap_servers, registry_dir=None)
    follower.start()
    try:
        assert follower.states[POLICY].promoted == by_role["policy"]
        assert follower.states[REWARD].promoted == by_role["reward"]
    finally:
        follower.stop()
