"""PII in served generations never reaches training: the policy server redacts what it
publishes to rlhf.prompts with the gateway's redactor, and the trainer's prompt pool (read
from that topic by the trainer's own reader) holds only the redacted text."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from rlhf import bus
from rlhf.models import build_tiny
from rlhf.pii import Redactor, redact_served
from rlhf.v1 import events_pb2, inference_pb2, inference_pb2_grpc
from tests.test_policy_server import INFER, _read_prompts, make_config, start
from trainer.config import DataConfig
from trainer.data import TrainingData
from trainer.metrics import TrainerMetrics
from trainer.reader import StreamReader, StreamTopics

RAW = "Mail jane.doe@example.com, call +1 415 555 0100, from 10.1.2.3."
REDACTED = "Mail [EMAIL], call [PHONE], from [IP]."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("policy") / "tiny", seed=0)


def test_served_prompts_are_redacted_in_the_topic_and_in_the_trainers_data(
    kafka, model_dir: Path
) -> None:
    server = start(make_config(model_dir, kafka.bootstrap_servers))
    try:
        rid = uuid.uuid4().hex
        with grpc.insecure_channel(f"127.0.0.1:{server.runtime.port}") as channel:
            reply = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                inference_pb2.GenerateRequest(
                    prompt=RAW, user_id=f"pii-{rid}", request_id=rid,
                    parameters=inference_pb2.GenerationParameters(max_new_tokens=3, seed=1),
                ),
                metadata=INFER,
                timeout=30,
            )  # fmt: skip
        assert reply.samples  # the caller sees its own prompt's generation, unchanged
        event = _read_prompts(kafka.bootstrap_servers, {rid})[rid]
        assert event.prompt == REDACTED
        count = server.registry.get_sample_value
        for kind in ("email", "phone", "ip"):
            assert count("rlhf_policy_pii_redactions_total", {"kind": kind}) >= 1, kind
    finally:
        server.stop_in_thread()

    # The trainer's reader over the same topic: its PPO prompt pool holds the redacted text.
    topics = StreamTopics.with_prefix("")
    consumer = bus.Consumer(
        kafka.bootstrap_servers, topics.inputs(), group_id=f"pii-{rid}", client_id="test-pii",
        start_offsets=StreamReader.start_offsets(topics, {}, True),
    )  # fmt: skip
    data = TrainingData(DataConfig(poll_timeout_s=0.2))
    reader = StreamReader(
        consumer, data, topics, {}, DataConfig(), TrainerMetrics(CollectorRegistry())
    )

    def pooled() -> list[str]:
        return [p.prompt for pool in data.prompts.values() for p in pool]

    try:
        deadline = time.monotonic() + 60
        while event.event_id not in {p.event_id for pool in data.prompts.values() for p in pool}:
            assert time.monotonic() < deadline, "the trainer never read the served generation"
            reader.poll()
    finally:
        consumer.close()
    assert REDACTED in pooled()
    assert not [p for p in pooled() if "jane.doe@example.com" in p or "555 0100" in p]


def test_a_redacted_sample_loses_its_token_ids_and_logprobs() -> None:
    event = events_pb2.ServedGeneration(
        event_id="e",
        prompt="hello",
        samples=[
            events_pb2.GeneratedSample(
                generation_id="g0", text="write to bob@example.org", token_ids=[1, 2],
                logprobs=[-0.5, -0.25],
            ),
            events_pb2.GeneratedSample(
                generation_id="g1", text="nothing here", token_ids=[3], logprobs=[-1.0]
            ),
        ],
    )  # fmt: skip
    found = redact_served(Redactor(), event)
    assert found == {"email": 1}
    assert event.prompt == "hello"
    assert event.samples[0].text == "write to [EMAIL]"
    assert list(event.samples[0].token_ids) == [] and list(event.samples[0].logprobs) == []
    assert list(event.samples[1].token_ids) == [3] and list(event.samples[1].logprobs) == [-1.0]
