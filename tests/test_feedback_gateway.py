"""The feedback gateway end to end: a real gRPC server on a localhost port, a real broker.

Events are read back with the dedupe rule consumers apply (first record of an event id wins),
and also counted raw, so a duplicate write would show.
"""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import CollectorRegistry

from rlhf import bus, topics
from rlhf.kafka_local import LocalKafka
from rlhf.runtime import ServerRuntime
from rlhf.split import split_for_user
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc
from services.feedback.config import KafkaConfig, LimitsConfig, ResolverConfig
from services.feedback.gateway import event_id_for, record_key
from services.feedback.server import (
    SERVICES,
    FeedbackRuntimeConfig,
    FeedbackServerConfig,
    add_servicers,
)
from services.feedback.tail import TopicTail
from tests.conftest import start_broker


@dataclass
class Gateway:
    runtime: ServerRuntime
    channel: grpc.Channel
    stub: feedback_pb2_grpc.FeedbackServiceStub
    registry: CollectorRegistry

    def stop(self) -> None:
        self.channel.close()
        self.runtime.stop_in_thread()

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def start_gateway(
    bootstrap: str,
    *,
    api_keys: str = "",
    ack_timeout_s: float = 5.0,
    metrics_port: int = -1,
    cors: tuple[str, ...] = (),
) -> Gateway:
    config = FeedbackServerConfig(
        kafka=KafkaConfig(bootstrap_servers=bootstrap, ack_timeout_s=ack_timeout_s),
        resolver=ResolverConfig(wait_s=1.0),
        runtime=FeedbackRuntimeConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=metrics_port,
            http_host="127.0.0.1",
            http_port=0,
            http_cors_origins=cors,
            api_keys=api_keys,
            grace_s=2,
        ),
        startup_timeout_s=60,
    )
    registry = CollectorRegistry()
    runtime = ServerRuntime(config.runtime, registry, component="feedback")
    runtime.start_in_thread(add_servicers(config, registry, runtime), SERVICES)
    assert runtime.wait_serving("rlhf.v1.FeedbackService", 60)
    channel = grpc.insecure_channel(f"127.0.0.1:{runtime.port}")
    return Gateway(runtime, channel, feedback_pb2_grpc.FeedbackServiceStub(channel), registry)


def read_events(bootstrap: str, watched: list[topics.Topic]) -> list[bus.Record]:
    """Every record of ``watched`` that is in Kafka now, in offset order per partition."""
    records: list[bus.Record] = []
    tail = TopicTail(bootstrap, watched, records.append, client_id="test-reader")
    tail.start()
    assert tail.wait_caught_up(60)
    tail.stop()
    return records


def first_per_event_id(records: list[bus.Record]) -> dict[str, bus.Record]:
    """The dedupe rule every consumer applies: keep the first record of each event id."""
    kept: dict[str, bus.Record] = {}
    for record in records:
        kept.setdefault(record.value.event_id, record)  # type: ignore[attr-defined]
    return kept


def comparison(key: str, *responses: feedback_pb2.ResponseRef, prompt: str = "Name a color.",
               ranks: tuple[int, ...] = (1, 2), user: str = "user-1") -> feedback_pb2.ComparisonRequest:  # fmt: skip
    return feedback_pb2.ComparisonRequest(
        prompt=prompt,
        responses=list(responses)
        or [feedback_pb2.ResponseRef(text="Blue."), feedback_pb2.ResponseRef(text="No.")],
        ranks=list(ranks),
        labeler_id="labeler-1",
        user_id=user,
        idempotency_key=key,
    )


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A broker for this module: the gateway writes to the real topic names, which other
    modules' tests read from the shared session broker."""
    kafka = start_broker(tmp_path_factory.mktemp("feedback-kafka"))
    yield kafka
    kafka.stop()


@pytest.fixture(scope="module")
def gateway(broker: LocalKafka) -> Iterator[Gateway]:
    gw = start_gateway(broker.bootstrap_servers)
    yield gw
    gw.stop()


def test_accepted_events_are_stored_byte_for_byte(broker: LocalKafka, gateway: Gateway) -> None:
    run = uuid.uuid4().hex[:8]
    prompt = f"[{run}] Write to bob@example.com: what should I name my cat?"
    generation = events_pb2.ServedGeneration(
        event_id=uuid.uuid4().hex,
        created_at_ms=int(time.time() * 1000),
        request_id="req-1",
        prompt=prompt,
        model_version="policy-v3",
        user_id="user-7",
        samples=[
            events_pb2.GeneratedSample(generation_id=f"{run}-a", text="Whiskers.", token_ids=[5, 6], logprobs=[-0.25, -1.5]),
            events_pb2.GeneratedSample(generation_id=f"{run}-b", text="Call 555-123-4567.", token_ids=[7], logprobs=[-2.0]),
        ],
    )  # fmt: skip
    request = comparison(
        f"{run}-cmp",
        feedback_pb2.ResponseRef(generation_id=f"{run}-b"),
        feedback_pb2.ResponseRef(text="Mittens, or Socks."),
        feedback_pb2.ResponseRef(generation_id=f"{run}-a"),
        prompt=prompt,
        ranks=(2, 2, 1),
        user="user-7",
    )
    # The policy server's record lands after the comparison arrived: the gateway waits for it.
    producer = bus.Producer(broker.bootstrap_servers, client_id="test-policy")
    publish = threading.Timer(
        0.3, producer.send_sync, [topics.PROMPTS, generation], {"key": "req-1"}
    )
    publish.start()
    ack = gateway.stub.SubmitComparison(request, timeout=10)
    publish.join()
    producer.close()
    demo_request = feedback_pb2.DemonstrationRequest(
        prompt=f"[{run}] My IP is 10.1.2.3, help", response="Sure.", labeler_id="labeler-2",
        user_id="user-8", idempotency_key=f"{run}-demo",
    )  # fmt: skip
    demo_ack = gateway.stub.SubmitDemonstration(demo_request, timeout=10)
    assert (ack.event_id, ack.duplicate) == (event_id_for("comparison", f"{run}-cmp"), False)
    assert demo_ack.event_id == event_id_for("demonstration", f"{run}-demo")

    stored = first_per_event_id(
        read_events(broker.bootstrap_servers, [topics.COMPARISONS, topics.DEMONSTRATIONS])
    )
    record = stored[ack.event_id]
    redacted_prompt = f"[{run}] Write to [EMAIL]: what should I name my cat?"
    expected = events_pb2.ComparisonEvent(
        event_id=ack.event_id,
        created_at_ms=record.value.created_at_ms,  # type: ignore[attr-defined]
        prompt=redacted_prompt,
        responses=[
            # Redacted text: its token ids would spell the phone number, so they are dropped.
            events_pb2.RankedResponse(text="Call [PHONE].", generation_id=f"{run}-b", model_version="policy-v3", rank=2),
            events_pb2.RankedResponse(text="Mittens, or Socks.", rank=2),
            events_pb2.RankedResponse(text="Whiskers.", generation_id=f"{run}-a", model_version="policy-v3",
                                      token_ids=[5, 6], logprobs=[-0.25, -1.5], rank=1),
        ],
        labeler_id="labeler-1",
        user_id="user-7",
        split=split_for_user("user-7", 0.05, 0.05),
        idempotency_key=f"{run}-cmp",
        redactions=2,
    )  # fmt: skip
    assert record.value.SerializeToString() == expected.SerializeToString()
    assert record.topic == topics.COMPARISONS.name and record.key == record_key(redacted_prompt)
    assert abs(expected.created_at_ms - time.time() * 1000) < 60_000

    demo = stored[demo_ack.event_id]
    expected_demo = events_pb2.DemonstrationEvent(
        event_id=demo_ack.event_id, created_at_ms=demo.value.created_at_ms,  # type: ignore[attr-defined]
        prompt=f"[{run}] My IP is [IP], help", response="Sure.", labeler_id="labeler-2",
        user_id="user-8", split=split_for_user("user-8", 0.05, 0.05),
        idempotency_key=f"{run}-demo", redactions=1,
    )  # fmt: skip
    assert demo.value.SerializeToString() == expected_demo.SerializeToString()
    assert gateway.metric("rlhf_feedback_pii_redactions_total", kind="email") >= 1
    assert gateway.metric("rlhf_feedback_pii_redactions_total", kind="phone") >= 1
    assert gateway.metric("rlhf_feedback_kafka_ack_seconds_count") >= 2


def test_rejections_explain_why(broker: LocalKafka, gateway: Gateway) -> None:
    run = uuid.uuid4().hex[:8]
    served = events_pb2.ServedGeneration(
        event_id=uuid.uuid4().hex, created_at_ms=int(time.time() * 1000), prompt="Another prompt",
        model_version="v1", samples=[events_pb2.GeneratedSample(generation_id=f"{run}-x", text="t")],
    )  # fmt: skip
    producer = bus.Producer(broker.bootstrap_servers, client_id="test-policy")
    producer.send_sync(topics.PROMPTS, served, key="r")
    producer.close()
    text = feedback_pb2.ResponseRef
    cases = [
        (comparison(f"{run}-1", text(text="only one"), ranks=(1,)), grpc.StatusCode.INVALID_ARGUMENT,
         "responses: K=1; a comparison ranks 2..9 responses"),
        (comparison(f"{run}-2", ranks=(1, 3)), grpc.StatusCode.INVALID_ARGUMENT,
         "ranks[1]: rank 3; ranks run from 1 (best) to at most 2"),
        (comparison(f"{run}-2b", ranks=(2**31, 1)), grpc.StatusCode.INVALID_ARGUMENT,
         "ranks[0]: rank 2147483648; ranks run from 1 (best) to at most 2"),
        (comparison(f"{run}-3", text(text="a"), text(text="a")), grpc.StatusCode.INVALID_ARGUMENT,
         "responses[1]: same text as responses[0]"),
        (comparison(""), grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key: required"),
        (comparison(f"{run}-4", text(generation_id=f"{run}-unknown"), text(text="b")),
         grpc.StatusCode.NOT_FOUND, f"responses[0].generation_id: '{run}-unknown' is unknown or expired"),
        (comparison(f"{run}-5", text(text="b"), text(generation_id=f"{run}-x")),
         grpc.StatusCode.INVALID_ARGUMENT, "was served for a different prompt"),
    ]  # fmt: skip
    for request, code, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            gateway.stub.SubmitComparison(request, timeout=10)
        assert caught.value.code() == code, caught.value.details()
        assert message in caught.value.details()
    with pytest.raises(grpc.RpcError, match="prompt: must not be empty"):
        gateway.stub.SubmitDemonstration(feedback_pb2.DemonstrationRequest(), timeout=10)
    rejected = "rlhf_feedback_events_rejected_total"
    assert gateway.metric(rejected, type="comparison", reason="unknown_generation") >= 1
    assert gateway.metric(rejected, type="comparison", reason="ranks") >= 1
    assert gateway.metric(rejected, type="demonstration", reason="empty_text") >= 1
    stored = first_per_event_id(read_events(broker.bootstrap_servers, [topics.COMPARISONS]))
    assert not {event_id_for("comparison", f"{run}-{i}") for i in range(1, 6)} & set(stored)


def test_retries_store_exactly_one_record_even_across_a_restart(
    broker: LocalKafka, gateway: Gateway
) -> None:
    run = uuid.uuid4().hex[:8]
    request = comparison(f"{run}-retry")
    first = gateway.stub.SubmitComparison(request, timeout=10)
    assert not first.duplicate
    again = [gateway.stub.SubmitComparison(request, timeout=10) for _ in range(2)]
    assert all(a.duplicate and a.event_id == first.event_id for a in again)

    # A burst of the same new key at once: one write, the others wait for it.
    racing = comparison(f"{run}-race")
    with ThreadPoolExecutor(8) as pool:
        acks = list(pool.map(lambda _: gateway.stub.SubmitComparison(racing, timeout=10), range(8)))
    assert len({a.event_id for a in acks}) == 1
    assert sorted(a.duplicate for a in acks) == [False] + [True] * 7
    assert gateway.metric("rlhf_feedback_dedupe_hits_total") >= 9

    demo = feedback_pb2.DemonstrationRequest(prompt="p", response="r", labeler_id="l",
                                             user_id="u", idempotency_key=f"{run}-demo")  # fmt: skip
    assert not gateway.stub.SubmitDemonstration(demo, timeout=10).duplicate

    # A new gateway process knows the events only from Kafka.
    restarted = start_gateway(broker.bootstrap_servers)
    try:
        after = restarted.stub.SubmitComparison(request, timeout=10)
        assert (after.event_id, after.duplicate) == (first.event_id, True)
        assert restarted.stub.SubmitComparison(racing, timeout=10).duplicate
        assert restarted.stub.SubmitDemonstration(demo, timeout=10).duplicate
    finally:
        restarted.stop()

    records = read_events(broker.bootstrap_servers, [topics.COMPARISONS])
    raw = Counter(r.value.event_id for r in records)  # type: ignore[attr-defined]
    assert raw[first.event_id] == 1 and raw[acks[0].event_id] == 1
    assert first.event_id in first_per_event_id(records)


def test_bulk_acks_each_item_and_auth_needs_the_feedback_scope(broker: LocalKafka) -> None:
    gw = start_gateway(
        broker.bootstrap_servers, api_keys="fb-key feedback; inf-key infer", metrics_port=0
    )
    try:
        run = uuid.uuid4().hex[:8]
        items = [
            feedback_pb2.FeedbackItem(comparison=comparison(f"{run}-0")),
            feedback_pb2.FeedbackItem(comparison=comparison(f"{run}-1", ranks=(1, 1))),
            feedback_pb2.FeedbackItem(demonstration=feedback_pb2.DemonstrationRequest(
                prompt="p", response="r", labeler_id="l", user_id="u", idempotency_key=f"{run}-2")),
            feedback_pb2.FeedbackItem(),
            feedback_pb2.FeedbackItem(comparison=comparison(f"{run}-0")),
        ]  # fmt: skip
        with pytest.raises(grpc.RpcError) as caught:
            gw.stub.SubmitBulk(iter(items), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            gw.stub.SubmitBulk(
                iter(items), timeout=10, metadata=[("authorization", "Bearer inf-key")]
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        reply = gw.stub.SubmitBulk(
            iter(items), timeout=10, metadata=[("authorization", "Bearer fb-key")]
        )
        assert [i.index for i in reply.items] == [0, 1, 2, 3, 4]
        invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert [i.code for i in reply.items] == [0, invalid, 0, invalid, 0]
        assert "every response is tied" in reply.items[1].message
        assert reply.items[0].ack.event_id == reply.items[4].ack.event_id
        assert not reply.items[0].ack.duplicate and reply.items[4].ack.duplicate
        assert (reply.accepted, reply.rejected) == (3, 2)
        assert gw.metric("rlhf_feedback_events_accepted_total", type="comparison") == 1
        assert gw.metric("rlhf_feedback_events_accepted_total", type="demonstration") == 1
        url = f"http://127.0.0.1:{gw.runtime.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            exposition = response.read().decode()
        for name in (
            'rlhf_feedback_events_accepted_total{type="comparison"} 1.0',
            'rlhf_feedback_events_rejected_total{reason="ranks",type="comparison"} 1.0',
            "rlhf_feedback_kafka_ack_seconds_bucket",
            "rlhf_feedback_dedupe_hits_total 1.0",
            "rlhf_feedback_requests_total",
        ):
            assert name in exposition, name
    finally:
        gw.stop()


def stored_ids(bootstrap: str, gw: Gateway, run: str) -> set[str]:
    """Event ids in Kafka after a marker submitted now was stored (so nothing is in flight)."""
    marker = gw.stub.SubmitComparison(comparison(f"{run}-marker"), timeout=10).event_id
    records = read_events(bootstrap, [topics.COMPARISONS, topics.DEMONSTRATIONS])
    ids = {r.value.event_id for r in records}  # type: ignore[attr-defined]
    assert marker in ids
    return ids


def test_a_bulk_stream_that_fails_stores_nothing(broker: LocalKafka, gateway: Gateway) -> None:
    """Streams that fail after good items (an item over the message limit, a client that
    gives up) store none of them; resending the items stores each exactly once. gRPC ends a
    failed client stream on the server as it ends a clean one, so the servicer must tell the
    two apart before it stores anything: several streams of each kind let a race show."""
    run = uuid.uuid4().hex[:8]
    batches = [
        [feedback_pb2.FeedbackItem(comparison=comparison(f"{run}-{b}-{i}")) for i in range(5)]
        for b in range(8)
    ]
    huge = feedback_pb2.FeedbackItem(
        demonstration=feedback_pb2.DemonstrationRequest(prompt="x" * (5 * 1024 * 1024))
    )
    for batch in batches[:4]:
        with pytest.raises(grpc.RpcError) as caught:
            gateway.stub.SubmitBulk(iter([*batch, huge]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    def cancelled_midway(
        batch: list[feedback_pb2.FeedbackItem],
    ) -> Iterator[feedback_pb2.FeedbackItem]:
        yield from batch
        raise RuntimeError("the client gives up")

    for batch in batches[4:]:
        with pytest.raises(grpc.RpcError) as caught:
            gateway.stub.SubmitBulk(cancelled_midway(batch), timeout=30)
        assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    ids = {event_id_for("comparison", f"{run}-{b}-{i}") for b in range(8) for i in range(5)}
    assert not ids & stored_ids(broker.bootstrap_servers, gateway, run)

    items = [item for batch in batches for item in batch]
    reply = gateway.stub.SubmitBulk(iter(items), timeout=30)
    assert [(i.code, i.ack.duplicate) for i in reply.items] == [(0, False)] * len(items)
    records = read_events(broker.bootstrap_servers, [topics.COMPARISONS])
    raw = Counter(r.value.event_id for r in records)  # type: ignore[attr-defined]
    assert all(raw[event_id] == 1 for event_id in ids)


def test_a_bulk_stream_over_the_item_limit_stores_nothing(broker: LocalKafka) -> None:
    config = FeedbackServerConfig(
        kafka=KafkaConfig(bootstrap_servers=broker.bootstrap_servers),
        limits=LimitsConfig(max_bulk_items=3),
        runtime=FeedbackRuntimeConfig(
            host="127.0.0.1", port=0, metrics_port=-1, http_port=-1, grace_s=1
        ),
        startup_timeout_s=60,
    )
    registry = CollectorRegistry()
    runtime = ServerRuntime(config.runtime, registry, component="feedback")
    runtime.start_in_thread(add_servicers(config, registry, runtime), SERVICES)
    assert runtime.wait_serving("rlhf.v1.FeedbackService", 60)
    channel = grpc.insecure_channel(f"127.0.0.1:{runtime.port}")
    gw = Gateway(runtime, channel, feedback_pb2_grpc.FeedbackServiceStub(channel), registry)
    try:
        run = uuid.uuid4().hex[:8]
        items = [feedback_pb2.FeedbackItem(comparison=comparison(f"{run}-{i}")) for i in range(4)]
        with pytest.raises(grpc.RpcError) as caught:
            gw.stub.SubmitBulk(iter(items), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 3 items" in caught.value.details()
        ids = {event_id_for("comparison", f"{run}-{i}") for i in range(4)}
        assert not ids & stored_ids(broker.bootstrap_servers, gw, run)
        assert gw.stub.SubmitBulk(iter(items[:3]), timeout=30).accepted == 3
    finally:
        gw.stop()
