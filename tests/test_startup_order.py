"""Start-up order: the broker is down when the policy server, the feedback gateway and the
trainer start. Each waits and retries (NOT_SERVING and a metric meanwhile; the trainer does
not exit), and once the broker is back each one works. The policy server never serves
without the models topic: the newest version on disk was rolled back, and it must not
come back.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from rlhf import bus, checkpoint, models, topics
from rlhf.kafka_local import LocalKafka
from rlhf.lifecycle import Kind, model_event, published_events
from rlhf.runtime import ServerRuntime
from rlhf.seed import seed_registry
from rlhf.streams import StreamsConfig
from rlhf.v1 import events_pb2, feedback_pb2_grpc
from services.feedback.config import KafkaConfig
from services.feedback.server import (
    SERVICES,
    FeedbackRuntimeConfig,
    FeedbackServerConfig,
    add_servicers,
)
from tests.test_feedback_gateway import comparison
from tests.test_serving_restart import INFERENCE, generate, health, server
from trainer.config import DataConfig, TrainerConfig
from trainer.main import run as run_trainer
from trainer.reader import StreamTopics

FEEDBACK = "rlhf.v1.FeedbackService"
POLICY = events_pb2.MODEL_ROLE_POLICY


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("bases")
    for seed in range(2):
        models.init_models(models.InitConfig(out=str(root / f"m{seed}"), seed=seed))
    return [root / f"m{seed}" for seed in range(2)]


def test_everything_waits_for_a_broker_that_is_down_at_start(
    private_kafka: LocalKafka, bases: list[Path], tmp_path: Path
) -> None:
    bootstrap = private_kafka.bootstrap_servers
    # History: v1 seeded; v2 published and promoted; then rolled back to v1.
    registry = tmp_path / "registry"
    producer = bus.Producer(bootstrap, client_id="startup-test")
    try:
        (v1,) = [m.version for m in seed_registry(registry, bases[0], producer)
                 if m.role == "policy"]  # fmt: skip
        manifest = checkpoint.publish(
            registry, "policy", bases[1] / "policy", round_type="ppo", parent=v1, metrics={},
            offsets={},
        )  # fmt: skip
        v2 = manifest.version
        events = published_events(manifest, registry / "policy" / v2, auto_promote=True,
                                  actor="test")  # fmt: skip
        events.append(model_event(Kind.MODEL_EVENT_KIND_ROLLED_BACK, POLICY, v1, actor="test"))
        for event in events:
            producer.send_sync(topics.MODELS, event, key=event.event_id)
    finally:
        producer.close()
    private_kafka.stop()

    policy = server(registry, bootstrap)
    policy.runtime.start_in_thread(policy.add_servicers, policy.services)
    gateway_config = FeedbackServerConfig(
        kafka=KafkaConfig(bootstrap_servers=bootstrap, ack_timeout_s=2.0),
        runtime=FeedbackRuntimeConfig(
            host="127.0.0.1", port=0, metrics_port=-1, http_port=-1, grace_s=1
        ),
    )
    gateway_metrics = CollectorRegistry()
    gateway = ServerRuntime(gateway_config.runtime, gateway_metrics, component="feedback")
    gateway.start_in_thread(add_servicers(gateway_config, gateway_metrics, gateway), SERVICES)
    channel = grpc.insecure_channel(f"127.0.0.1:{gateway.port}")
    feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
    prefix = f"startup-{uuid.uuid4().hex[:6]}."
    trainer_metrics = CollectorRegistry()
    stop = threading.Event()
    models.init_models(models.InitConfig(out=str(tmp_path / "trainer-base")))
    trainer_cfg = TrainerConfig(
        bootstrap_servers=bootstrap, group_id=prefix, streams=StreamsConfig(topic_prefix=prefix),
        registry=tmp_path / "trainer-registry", base_model=tmp_path / "trainer-base",
        device="cpu", metrics_port=0, progress="off", data=DataConfig(poll_timeout_s=0.2),
    )  # fmt: skip
    failures: list[BaseException] = []

    def trainer() -> None:
        try:
            run_trainer(trainer_cfg, registry=trainer_metrics, stop=stop, serve_metrics=False)
        except BaseException as exc:
            failures.append(exc)

    trainer_thread = threading.Thread(target=trainer, daemon=True)
    trainer_thread.start()
    try:
        waiting = "rlhf_trainer_waiting_for_kafka"
        wait_until(lambda: trainer_metrics.get_sample_value(waiting) == 1, 120, "trainer waits")
        assert trainer_thread.is_alive() and not failures
        # By now a server choosing from the registry alone would have loaded v2 long ago.
        assert "models_topic" in policy.runtime.failing(INFERENCE)
        assert health(policy.runtime.port) == 2  # NOT_SERVING
        assert policy.pool.resident() == []
        with pytest.raises(grpc.RpcError) as err:
            generate(policy.runtime.port)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "index" in gateway.failing(FEEDBACK)
        condition = "rlhf_feedback_health_condition"
        labels = {"service": FEEDBACK, "condition": "index"}
        assert gateway_metrics.get_sample_value(condition, labels) == 0
        with pytest.raises(grpc.RpcError) as err:
            feedback.SubmitComparison(comparison("early"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "starting" in err.value.details()

        private_kafka.start()
        assert policy.runtime.wait_serving(INFERENCE, 120)
        assert generate(policy.runtime.port).model_version == v1  # the rollback holds
        assert policy.pool.resident() == [v1]
        assert gateway.wait_serving(FEEDBACK, 120)
        assert not feedback.SubmitComparison(comparison("late"), timeout=30).duplicate
        wait_until(lambda: trainer_metrics.get_sample_value(waiting) == 0, 120, "trainer starts")
        trainer_topics = StreamTopics.with_prefix(prefix)
        wait_until(
            lambda: not bus.missing_topics(bootstrap, [*trainer_topics.inputs()]),
            60,
            "the trainer's topics",
        )
    finally:
        stop.set()
        trainer_thread.join(60)
        channel.close()
        gateway.stop_in_thread()
        policy.stop_in_thread()
    assert not failures, failures
