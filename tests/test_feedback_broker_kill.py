"""The broker is SIGKILLed while submissions are in flight and stays away for longer than the
producer's delivery timeout: the records in flight expire inside the producer. Afterwards the
gateway must store again once the broker is back, and while it cannot store, health must not
say SERVING. Meanwhile a ranking by generation id gets a retryable UNAVAILABLE, not NOT_FOUND:
the gateway cannot know that the id does not exist.
"""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from rlhf.kafka_local import LocalKafka
from rlhf.runtime import ServerRuntime
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc
from services.feedback.config import KafkaConfig, ResolverConfig
from services.feedback.server import (
    SERVICES,
    FeedbackRuntimeConfig,
    FeedbackServerConfig,
    add_servicers,
)
from tests.test_feedback_gateway import comparison

SERVICE = "rlhf.v1.FeedbackService"
DELIVERY_TIMEOUT_MS = 12_000


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status


def rank_unknown_generation(stub, key: str) -> grpc.StatusCode:
    request = comparison(
        key,
        feedback_pb2.ResponseRef(generation_id=f"never-served-{key}"),
        feedback_pb2.ResponseRef(text="A labeler's own answer."),
    )
    try:
        stub.SubmitComparison(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_gateway_stores_again_after_sigkill_outage_longer_than_delivery_timeout(
    private_kafka: LocalKafka,
) -> None:
    config = FeedbackServerConfig(
        kafka=KafkaConfig(
            bootstrap_servers=private_kafka.bootstrap_servers,
            ack_timeout_s=1.0,
            delivery_timeout_ms=DELIVERY_TIMEOUT_MS,
        ),
        resolver=ResolverConfig(wait_s=0.5),
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
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
    stop = threading.Event()
    try:
        stub.SubmitComparison(comparison("before-0"), timeout=30)
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        # Broker up: a generation id the gateway has confirmed absent is NOT_FOUND.
        assert rank_unknown_generation(stub, "before-gen") == grpc.StatusCode.NOT_FOUND

        def submit_forever(worker: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                with contextlib.suppress(grpc.RpcError):
                    stub.SubmitComparison(comparison(f"kill-{worker}-{i}"), timeout=10)

        workers = [threading.Thread(target=submit_forever, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        accepted = "rlhf_feedback_events_accepted_total"
        wait_until(
            lambda: (registry.get_sample_value(accepted, {"type": "comparison"}) or 0) > 50,
            60,
            "submissions flowing",
        )
        private_kafka.kill()  # records are in flight: sent, not acked
        stop.set()
        for w in workers:
            w.join()

        # Records left in the producer expire once the delivery timeout passes.
        errors = "rlhf_bus_produce_errors_total"
        wait_until(
            lambda: (registry.get_sample_value(errors, {"topic": "rlhf.comparisons"}) or 0) > 0,
            DELIVERY_TIMEOUT_MS / 1000 + 30,
            "in-flight records to expire",
        )
        # It cannot store: health must say so.
        wait_until(
            lambda: health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING,
            15,
            "NOT_SERVING while the broker is down",
        )

        # Broker down: the gateway cannot know the id is absent; the answer is retryable.
        assert rank_unknown_generation(stub, "during-gen") == grpc.StatusCode.UNAVAILABLE

        private_kafka.start()
        # Back: it stores again without a restart, and health says SERVING again.
        back = time.monotonic()
        deadline = back + 60
        attempt = 0
        while True:
            attempt += 1
            try:
                stub.SubmitComparison(comparison(f"after-{attempt}"), timeout=10)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() < deadline, "the gateway never stored again"
                time.sleep(0.5)
        # Promptly: clients reconnect within a second (kafka-python's default backoff of up
        # to 30 s once made this take up to 58 s).
        assert time.monotonic() - back < 30, (
            f"stored again only after {time.monotonic() - back:.0f} s"
        )
        wait_until(
            lambda: health(channel) == health_pb2.HealthCheckResponse.SERVING,
            30,
            "SERVING after the broker came back",
        )
    finally:
        stop.set()
        channel.close()
        runtime.stop_in_thread()
