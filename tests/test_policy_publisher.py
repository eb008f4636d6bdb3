"""The served-generation publisher when Kafka cannot be reached: it never blocks the caller,
keeps a bounded buffer, and counts and logs every record it drops."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from rlhf.bus import Producer
from rlhf.kafka_local import free_port
from rlhf.v1 import events_pb2
from services.policy.publisher import GenerationPublisher


def test_unreachable_broker_drops_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    # A port nothing listens on: every send fails after max_block_ms.
    producer = Producer(
        f"127.0.0.1:{free_port()}",
        client_id="test-publisher",
        max_block_ms=300,
        request_timeout_ms=300,
    )
    publisher = GenerationPublisher(
        producer, CollectorRegistry(), buffer_size=2, ack_timeout_s=0.5, max_backoff_s=0.5
    )
    start = time.perf_counter()
    for i in range(5):
        publisher.publish(events_pb2.ServedGeneration(event_id=f"e{i}", request_id=f"r{i}"))
    assert time.perf_counter() - start < 0.1  # publishing never waits on Kafka
    assert publisher.pending() == 2
    assert publisher.dropped.labels("buffer_full")._value.get() == 3
    with caplog.at_level("ERROR", logger="services.policy.publisher"):
        publisher.close(timeout_s=0.5)
    assert publisher.dropped.labels("shutdown")._value.get() == 2
    assert publisher.published._value.get() == 0
    assert "dropped 2 served generation(s) not published to rlhf.prompts (shutdown)" in caplog.text
    assert (
        "dropped 2 served generation(s) not published to rlhf.prompts (buffer_full)" in caplog.text
    )
    publisher.publish(events_pb2.ServedGeneration(event_id="late"))
    assert publisher.dropped.labels("closed")._value.get() == 1
