"""Background threads that must not die silently: a topic tail or the model follower whose
loop fails is restarted, the failure shows in health (the reported condition) and in
``rlhf_<component>_thread_restarts_total``, and no record is lost. Every Kafka client
reconnects promptly after a broker comes back."""

from __future__ import annotations

import threading
import time
import uuid

from prometheus_client import CollectorRegistry

from rlhf import bus, topics
from rlhf.lifecycle import Kind, ModelFollower, ModelState, model_event
from rlhf.runtime import RuntimeConfig
from rlhf.v1 import events_pb2
from services.feedback.tail import TopicTail


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


class Reports:
    def __init__(self) -> None:
        self.seen: list[tuple[bool, str]] = []
        self.lock = threading.Lock()

    def __call__(self, ok: bool, detail: str) -> None:
        with self.lock:
            self.seen.append((ok, detail))

    def oks(self) -> list[bool]:
        with self.lock:
            return [ok for ok, _ in self.seen]


def test_a_failing_tail_is_restarted_reported_and_loses_nothing(kafka) -> None:
    topic = topics.Topic(f"sup-{uuid.uuid4().hex[:6]}", events_pb2.ServedGeneration, 1)
    bus.ensure_topics(kafka.bootstrap_servers, [topic])
    producer = bus.Producer(kafka.bootstrap_servers, client_id="sup-test")
    for i in range(5):
        producer.send_sync(topic, events_pb2.ServedGeneration(event_id=f"e{i}"), key="k")
    producer.close()
    handled: list[str] = []
    failed = threading.Event()

    def handle(record: bus.Record) -> None:
        event_id = record.value.event_id  # type: ignore[attr-defined]
        if event_id == "e2" and not failed.is_set():
            failed.set()
            raise RuntimeError("a handler bug on e2")
        handled.append(event_id)

    reports = Reports()
    registry = CollectorRegistry()
    tail = TopicTail(kafka.bootstrap_servers, [topic], handle, client_id="sup-test",
                     registry=registry, report=reports)  # fmt: skip
    tail.start()
    try:
        wait_until(lambda: handled == [f"e{i}" for i in range(5)])
        assert tail.wait_caught_up(30)
        wait_until(lambda: reports.oks()[-1:] == [True])
        # Failing, then healthy again (healthy first too if e2 came in a later batch).
        assert reports.oks()[-2:] == [False, True]
        failure = next(detail for ok, detail in reports.seen if not ok)
        assert "a handler bug on e2" in failure
        restarts = registry.get_sample_value(
            "rlhf_feedback_thread_restarts_total", {"thread": f"tail-{topic.name}"}
        )
        assert restarts == 1
        assert tail.confirmed_after(time.monotonic() - 60)
    finally:
        tail.stop()


def test_a_failing_model_follower_is_restarted_and_converges(kafka) -> None:
    # The models topic of the session broker holds other tests' events; a role nobody else
    # uses (by number) keeps this test's state to itself.
    role = 77
    version = f"policy-{uuid.uuid4().hex[:6]}"
    states: list[str | None] = []
    broke = threading.Event()

    def on_change(state: ModelState) -> None:
        if not broke.is_set():
            broke.set()
            raise RuntimeError("on_change bug")
        states.append(state.promoted)

    reports: list[tuple[str, bool]] = []
    registry = CollectorRegistry()
    follower = ModelFollower(
        roles=(role,), bootstrap_servers=kafka.bootstrap_servers, registry_dir=None,
        on_change=on_change, registry=registry, component="policy",
        report=lambda name, ok, _detail: reports.append((name, ok)),
    )  # fmt: skip
    assert follower.start(wait_s=60)
    producer = bus.Producer(kafka.bootstrap_servers, client_id="sup-test")
    try:
        for kind in (Kind.MODEL_EVENT_KIND_PUBLISHED, Kind.MODEL_EVENT_KIND_PROMOTED):
            event = model_event(kind, role, version, path="/nowhere")
            producer.send_sync(topics.MODELS, event, key=event.event_id)
        wait_until(lambda: version in states)
        restarts = registry.get_sample_value(
            "rlhf_policy_thread_restarts_total", {"thread": "model-follower"}
        )
        assert restarts == 1
        assert ("model_follower", False) in reports
        wait_until(lambda: reports[-1] == ("model_follower", True))
        assert follower.states[role].promoted == version
    finally:
        producer.close()
        follower.stop()


def test_kafka_clients_reconnect_within_a_second_and_servers_bind_loopback() -> None:
    """kafka-python backs off up to 30 s between reconnects by default; after an outage
    that kept every component idle long after the broker was back."""
    address = "127.0.0.1:1"
    producer = bus.Producer(address, client_id="backoff-test")
    consumer = bus.Consumer(address, [topics.MODELS], group_id="g", client_id="backoff-test")
    probe = bus.BrokerProbe(address, [topics.MODELS], client_id="backoff-test", timeout_s=1)
    try:
        for client in (producer._producer, consumer._kafka, probe._kafka):
            assert client.config["reconnect_backoff_max_ms"] <= 1000
    finally:
        producer.close(timeout_s=1)
        consumer.close()
        probe.close()
    config = RuntimeConfig()
    assert (config.host, config.metrics_host, config.http_host) == ("127.0.0.1",) * 3
    assert events_pb2.MODEL_ROLE_POLICY != 77
