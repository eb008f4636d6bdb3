"""The broker goes away in the middle of a burst of submissions and comes back.

Every submission the gateway answered OK must be in Kafka exactly once afterwards; the others
got an error status, and retrying them with the same key stores each exactly once.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
from prometheus_client import CollectorRegistry

from rlhf import topics
from rlhf.kafka_local import LocalKafka
from rlhf.runtime import ServerRuntime
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc
from services.feedback.config import KafkaConfig
from services.feedback.gateway import event_id_for
from services.feedback.server import (
    SERVICES,
    FeedbackRuntimeConfig,
    FeedbackServerConfig,
    add_servicers,
)
from tests.test_feedback_gateway import comparison, read_events

WORKERS = 8


async def burst(address: str, broker: LocalKafka) -> dict[str, grpc.StatusCode]:
    """Submits without pause from WORKERS clients while the broker is stopped and restarted;
    returns the status each idempotency key got."""
    results: dict[str, grpc.StatusCode] = {}
    changed = asyncio.Condition()
    done = asyncio.Event()

    async def count(code: grpc.StatusCode) -> int:
        return sum(1 for c in results.values() if c == code)

    async def until(predicate_code: grpc.StatusCode, at_least: int) -> None:
        async with changed:
            await changed.wait_for(
                lambda: sum(1 for c in results.values() if c == predicate_code) >= at_least
            )

    async with grpc.aio.insecure_channel(address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)

        async def worker(w: int) -> None:
            i = 0
            while not done.is_set():
                key = f"burst-{w}-{i}"
                i += 1
                try:
                    await stub.SubmitComparison(comparison(key, user=f"user-{i % 5}"), timeout=30)
                    results[key] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    results[key] = exc.code()
                async with changed:
                    changed.notify_all()

        workers = [asyncio.create_task(worker(w)) for w in range(WORKERS)]
        await until(grpc.StatusCode.OK, 200)
        await asyncio.to_thread(broker.stop)
        await until(grpc.StatusCode.UNAVAILABLE, WORKERS)
        await asyncio.to_thread(broker.start)
        ok_before = await count(grpc.StatusCode.OK)
        await until(grpc.StatusCode.OK, ok_before + 200)
        done.set()
        await asyncio.gather(*workers)
    return results


async def retry(address: str, keys: list[str]) -> list[feedback_pb2.SubmitAck]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        return list(
            await asyncio.gather(*(stub.SubmitComparison(comparison(k), timeout=30) for k in keys))
        )


def test_broker_outage_during_a_burst_loses_and_duplicates_nothing(
    private_kafka: LocalKafka,
) -> None:
    config = FeedbackServerConfig(
        kafka=KafkaConfig(bootstrap_servers=private_kafka.bootstrap_servers, ack_timeout_s=1.0),
        runtime=FeedbackRuntimeConfig(
            host="127.0.0.1", port=0, metrics_port=-1, http_port=-1, grace_s=2
        ),
        startup_timeout_s=60,
    )
    registry = CollectorRegistry()
    runtime = ServerRuntime(config.runtime, registry, component="feedback")
    runtime.start_in_thread(add_servicers(config, registry, runtime), SERVICES)
    assert runtime.wait_serving("rlhf.v1.FeedbackService", 60)
    address = f"127.0.0.1:{runtime.port}"
    try:
        results = asyncio.run(burst(address, private_kafka))
        statuses = Counter(results.values())
        assert set(statuses) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, statuses
        assert statuses[grpc.StatusCode.UNAVAILABLE] >= WORKERS

        stored = Counter(
            r.value.event_id  # type: ignore[attr-defined]
            for r in read_events(private_kafka.bootstrap_servers, [topics.COMPARISONS])
        )
        ids = {key: event_id_for("comparison", key) for key in results}
        for key, status in results.items():
            if status == grpc.StatusCode.OK:
                assert stored[ids[key]] == 1, key
            else:  # it may still have been stored once, late; never twice
                assert stored[ids[key]] <= 1, key
        assert set(stored) <= set(ids.values())

        failed = [k for k, status in results.items() if status != grpc.StatusCode.OK]
        acks = asyncio.run(retry(address, failed))
        assert [a.event_id for a in acks] == [ids[k] for k in failed]
        # Those that had landed late are answered as duplicates, not written again.
        assert all(a.duplicate for a, k in zip(acks, failed, strict=True) if stored[ids[k]])

        stored = Counter(
            r.value.event_id  # type: ignore[attr-defined]
            for r in read_events(private_kafka.bootstrap_servers, [topics.COMPARISONS])
        )
        assert stored == Counter(set(ids.values()))
    finally:
        runtime.stop_in_thread()
