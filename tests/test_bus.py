"""The event bus against a real broker: round trips, committed offsets, restarts, dead letters."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from rlhf import bus
from rlhf.kafka_local import LocalKafka, free_port
from rlhf.topics import Topic, dead_letter
from rlhf.v1 import events_pb2, inference_pb2


def fresh_topic(
    kafka: LocalKafka, record: type = events_pb2.DemonstrationEvent, partitions: int = 2
) -> Topic:
    topic = Topic(f"test.{uuid.uuid4().hex[:8]}", record, partitions=partitions)
    bus.ensure_topics(kafka.bootstrap_servers, [topic])
    return topic


def demo(i: int) -> events_pb2.DemonstrationEvent:
    return events_pb2.DemonstrationEvent(
        event_id=f"ev-{i}", prompt=f"prompt {i}", response=f"response {i}", user_id=f"u{i % 3}",
        split=events_pb2.SPLIT_TRAIN,
    )  # fmt: skip


def consume(consumer: bus.Consumer, want: int, timeout_s: float = 30.0) -> list[bus.Record]:
    got: list[bus.Record] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += consumer.poll(timeout_s=0.5)
    return got


@pytest.fixture
def producer(kafka: LocalKafka) -> bus.Producer:
    p = bus.Producer(kafka.bootstrap_servers, client_id="test-producer")
    yield p
    p.close()


def new_consumer(kafka: LocalKafka, topic: Topic, group: str, **kw) -> bus.Consumer:
    return bus.Consumer(kafka.bootstrap_servers, [topic], group_id=group, client_id=group, **kw)


@pytest.mark.parametrize(
    "record",
    [
        events_pb2.ServedGeneration(
            event_id="g1", prompt="Hi", model_version="policy-000001", user_id="u",
            parameters=inference_pb2.GenerationParameters(temperature=1.0, stop=["\n"], seed=3),
            samples=[events_pb2.GeneratedSample(generation_id="x", text="yo", token_ids=[1, 2],
                                                logprobs=[-0.5, -1.25])],
        ),
        events_pb2.ComparisonEvent(
            event_id="c1", prompt="Hi", labeler_id="l", user_id="u", split=events_pb2.SPLIT_TEST,
            responses=[events_pb2.RankedResponse(text="a", rank=1),
                       events_pb2.RankedResponse(text="b", rank=1),
                       events_pb2.RankedResponse(text="c", rank=2)],
        ),
        events_pb2.DemonstrationEvent(event_id="d1", prompt="Hi", response="Hello!"),
        events_pb2.ModelEvent(event_id="m1", kind=events_pb2.MODEL_EVENT_KIND_PUBLISHED,
                              role=events_pb2.MODEL_ROLE_POLICY, version="policy-000002",
                              metrics={"reward": 0.25}),
    ],
    ids=["served", "comparison", "demonstration", "model"],
)  # fmt: skip
def test_each_record_type_round_trips_through_the_broker(kafka, producer, record):
    topic = fresh_topic(kafka, type(record))
    producer.send_sync(topic, record, key="k")
    consumer = new_consumer(kafka, topic, f"g-{uuid.uuid4().hex[:6]}")
    try:
        (got,) = consume(consumer, 1)
    finally:
        consumer.close()
    assert got.value == record
    assert got.value.SerializeToString() == record.SerializeToString()
    assert got.key == "k" and got.topic == topic.name


def test_send_rejects_a_record_of_the_wrong_type(kafka, producer):
    topic = fresh_topic(kafka, events_pb2.ComparisonEvent)
    with pytest.raises(TypeError, match="takes ComparisonEvent"):
        producer.send(topic, demo(0), key="k")


def test_consumer_group_resumes_from_committed_offsets(kafka, producer):
    topic = fresh_topic(kafka)
    for i in range(10):
        producer.send_sync(topic, demo(i), key=f"k{i % 4}")
    first = new_consumer(kafka, topic, "resume")
    got = consume(first, 10)
    assert len(got) == 10
    # Commit only the first half of what was read (per partition), then go away.
    upto: dict[tuple[str, int], int] = {}
    for r in sorted(got, key=lambda r: r.offset)[:5]:
        upto[(r.topic, r.partition)] = max(upto.get((r.topic, r.partition), 0), r.offset + 1)
    first.commit(upto)
    first.close()

    second = new_consumer(kafka, topic, "resume")
    try:
        rest = consume(second, 5)
        assert not second.poll(timeout_s=1.0)
    finally:
        second.close()
    seen_first = {
        (r.partition, r.offset) for r in got if r.offset < upto.get((r.topic, r.partition), 0)
    }
    seen_again = {(r.partition, r.offset) for r in rest}
    assert len(seen_first) == 5
    assert seen_first.isdisjoint(seen_again)
    assert seen_first | seen_again == {(r.partition, r.offset) for r in got}


def test_start_offsets_override_the_committed_ones(kafka, producer):
    topic = fresh_topic(kafka, partitions=1)
    for i in range(6):
        producer.send_sync(topic, demo(i), key="k")
    c = new_consumer(kafka, topic, "override", start_offsets={(topic.name, 0): 4})
    try:
        got = consume(c, 2)
    finally:
        c.close()
    assert [r.value.event_id for r in got] == ["ev-4", "ev-5"]


@pytest.mark.parametrize("stop", [LocalKafka.stop, LocalKafka.kill], ids=["sigterm", "sigkill"])
def test_acked_records_survive_a_broker_restart(private_kafka, stop: Callable[[LocalKafka], None]):
    topic = fresh_topic(private_kafka, partitions=3)
    p = bus.Producer(private_kafka.bootstrap_servers, client_id="restart")
    acked = [demo(i) for i in range(50)]
    for ev in acked:
        p.send_sync(topic, ev, key=ev.event_id)
    p.close()

    stop(private_kafka)
    assert not private_kafka.is_running()
    private_kafka.start()

    c = new_consumer(private_kafka, topic, "after-restart")
    try:
        got = consume(c, len(acked), timeout_s=60)
    finally:
        c.close()
    assert sorted(r.value.event_id for r in got) == sorted(ev.event_id for ev in acked)


def test_poison_record_goes_to_the_dead_letter_topic_and_consumption_continues(kafka, producer):
    topic = fresh_topic(kafka, partitions=1)
    producer.send_sync(topic, demo(1), key="a")
    producer.send_raw(topic.name, b"\xff\xff\xff\xff not protobuf", key=b"bad").get(timeout=10)
    producer.send_raw(topic.name, b"", key=b"empty").get(timeout=10)  # parses, but no event_id
    producer.send_sync(topic, demo(2), key="b")

    dlq_topic = Topic(dead_letter(topic.name), events_pb2.DemonstrationEvent, partitions=1)
    c = new_consumer(kafka, topic, "poison", dead_letter=producer)
    try:
        got = consume(c, 2)
    finally:
        c.close()
    assert [r.value.event_id for r in got] == ["ev-1", "ev-2"]

    from kafka import KafkaConsumer

    raw = KafkaConsumer(
        dlq_topic.name, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest",
        consumer_timeout_ms=10_000, group_id=None,
    )  # fmt: skip
    dead = []
    for m in raw:
        dead.append(m)
        if len(dead) == 2:
            break
    raw.close()
    assert [m.key for m in dead] == [b"bad", b"empty"]
    assert dead[0].value == b"\xff\xff\xff\xff not protobuf"
    headers = dict(dead[0].headers)
    assert headers["rlhf.source"] == f"{topic.name}[0]@1".encode()
    assert b"corrupt" in headers["rlhf.error"] or b"parsing" in headers["rlhf.error"]
    assert dict(dead[1].headers)["rlhf.error"] == b"record has no event_id"


def test_send_to_an_unreachable_broker_fails_with_publish_error_in_bounded_time():
    topic = Topic("test.nobroker", events_pb2.DemonstrationEvent, partitions=1)
    # Building the producer needs no broker; sending fails once max_block_ms has passed.
    p = bus.Producer(f"127.0.0.1:{free_port()}", client_id="nobroker", max_block_ms=1000)
    started = time.monotonic()
    with pytest.raises(bus.PublishError, match="test.nobroker: not acked"):
        p.send_sync(topic, demo(0), key="k", timeout_s=2.0)
    assert time.monotonic() - started < 10
    p.close(timeout_s=1)


def test_kafka_security_settings_come_from_the_environment():
    env = {
        "RLHF_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "RLHF_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "RLHF_KAFKA_SASL_USERNAME": "trainer",
        "RLHF_KAFKA_SASL_PASSWORD": "s3cret",
    }
    assert bus.security_from_env(env) == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "trainer",
        "sasl_plain_password": "s3cret",
    }
    assert bus.security_from_env({}) == {}
    assert bus.security_from_env({"RLHF_KAFKA_SECURITY_PROTOCOL": "SSL"}) == {
        "security_protocol": "SSL"
    }


def test_producers_and_consumers_share_one_metrics_registry(kafka):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    topic = fresh_topic(kafka, partitions=1)
    p = bus.Producer(kafka.bootstrap_servers, client_id="m1", registry=registry)
    dlq = bus.Producer(kafka.bootstrap_servers, client_id="m2", registry=registry)
    c = new_consumer(kafka, topic, "metrics", registry=registry, dead_letter=dlq)
    try:
        p.send_sync(topic, demo(1), key="k")
        assert len(consume(c, 1)) == 1
    finally:
        c.close()
        p.close()
        dlq.close()
    assert registry.get_sample_value("rlhf_bus_records_produced_total", {"topic": topic.name}) == 1
    assert registry.get_sample_value("rlhf_bus_records_consumed_total", {"topic": topic.name}) == 1
