"""The chat path end to end on the BPE family, every component real: chat requests to the
policy server -> served generations on Kafka -> conversations ranked and demonstrated through
the feedback gateway -> SFT, RM and PPO-ptx rounds encoding them with the chat template ->
the new version hot-swapped in and served with the same template and its recorded encoding."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from rlhf import bus, checkpoint, topics
from rlhf.config import load_config
from rlhf.runtime import ServerRuntime
from rlhf.seed import seed_registry
from rlhf.split import split_for_user
from rlhf.tokenizer import load_tokenizer
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc, inference_pb2, inference_pb2_grpc
from services.feedback.config import KafkaConfig, ResolverConfig
from services.feedback.server import (
    SERVICES,
    FeedbackRuntimeConfig,
    FeedbackServerConfig,
    add_servicers,
)
from services.policy.config import PolicyServerConfig
from services.policy.server import PolicyServer
from trainer.config import (
    EncodingConfig,
    GatesConfig,
    PPOConfig,
    RMConfig,
    ScheduleConfig,
    SFTConfig,
    TrainerConfig,
)
from trainer.main import run

CORPUS = Path(__file__).resolve().parents[1] / "data" / "pretrain.txt"
M = inference_pb2.ChatMessage
TOPICS = ["rivers", "bread", "the moon", "bees", "maps", "trains", "Grüße", "你好", "cafés",
          "boats", "snow", "books"]  # fmt: skip


def conversation(i: int) -> list[inference_pb2.ChatMessage]:
    return [
        M(role="system", content="Answer briefly."),
        M(role="user", content=f"Question {i:02d}: tell me about {TOPICS[i]}."),
    ]


def start_gateway(bootstrap: str) -> tuple[ServerRuntime, grpc.Channel]:
    config = FeedbackServerConfig(
        kafka=KafkaConfig(bootstrap_servers=bootstrap),
        resolver=ResolverConfig(wait_s=30.0),  # the policy server publishes in the background
        runtime=FeedbackRuntimeConfig(host="127.0.0.1", port=0, metrics_port=-1, http_port=-1),
        startup_timeout_s=60,
    )
    registry = CollectorRegistry()
    runtime = ServerRuntime(config.runtime, registry, component="feedback")
    runtime.start_in_thread(add_servicers(config, registry, runtime), SERVICES)
    assert runtime.wait_serving("rlhf.v1.FeedbackService", 60)  # its index read from Kafka
    return runtime, grpc.insecure_channel(f"127.0.0.1:{runtime.port}")


def start_policy_server(registry: Path, bootstrap: str) -> PolicyServer:
    config = load_config(
        PolicyServerConfig,
        flags={
            "model.registry": str(registry),
            "model.device": "cpu",
            "follow.bootstrap_servers": bootstrap,
            "publish.bootstrap_servers": bootstrap,
            "runtime.host": "127.0.0.1",
            "runtime.port": "0",
            "runtime.metrics_port": "-1",
            "runtime.http_port": "-1",
        },
    )
    server = PolicyServer(config, CollectorRegistry())
    server.start_in_thread()
    return server


def served_record(bootstrap: str, request_id: str) -> events_pb2.ServedGeneration:
    consumer = bus.Consumer(bootstrap, [topics.PROMPTS], group_id=uuid.uuid4().hex, client_id="t")
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            for record in consumer.poll(timeout_s=1.0):
                if record.value.request_id == request_id:
                    return record.value  # type: ignore[return-value]
    finally:
        consumer.close()
    raise AssertionError(f"request {request_id} never reached Kafka")


def test_chat_requests_feedback_rounds_and_the_new_version(
    family_models: Callable[[str], Path], private_kafka, tmp_path: Path
) -> None:
    bootstrap = private_kafka.bootstrap_servers
    base, registry = tmp_path / "base", tmp_path / "registry"
    shutil.copytree(family_models("bpe"), base)
    producer = bus.Producer(bootstrap, client_id="test-chat-e2e")
    seed_registry(registry, base, producer)
    producer.close()
    init_version = checkpoint.latest(registry, "policy").name  # type: ignore[union-attr]
    users = [u for u in (f"chat-user-{i}" for i in range(60))
             if split_for_user(u, 0.05, 0.05) == events_pb2.SPLIT_TRAIN][: len(TOPICS)]  # fmt: skip
    long_chat = [M(role="user", content="Tell me everything about rivers and the sea. " * 6)]

    policy = start_policy_server(registry, bootstrap)
    gateway, channel = start_gateway(bootstrap)
    try:
        infer = inference_pb2_grpc.InferenceServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{policy.runtime.port}")
        )
        feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
        before = infer.Generate(inference_pb2.GenerateRequest(messages=long_chat), timeout=30)
        assert before.model_version == init_version and before.prompt_tokens > 40
        for i, user in enumerate(users):
            reply = infer.Generate(
                inference_pb2.GenerateRequest(
                    messages=conversation(i), n=4, user_id=user,
                    parameters=inference_pb2.GenerationParameters(max_new_tokens=10, seed=i, temperature=1.0),
                ),
                timeout=60,
            )  # fmt: skip
            distinct = {s.text: s.generation_id for s in reply.samples}
            ranked = sorted(distinct, key=lambda t: (len(t), t))
            assert len(ranked) >= 2
            feedback.SubmitComparison(
                feedback_pb2.ComparisonRequest(
                    messages=conversation(i),
                    responses=[feedback_pb2.ResponseRef(generation_id=distinct[t]) for t in ranked],
                    ranks=list(range(1, len(ranked) + 1)), labeler_id="labeler-1", user_id=user,
                    idempotency_key=f"cmp-{i}",
                ),
                timeout=60,
            )  # fmt: skip
            feedback.SubmitDemonstration(
                feedback_pb2.DemonstrationRequest(
                    messages=conversation(i), response=f"Here is a short answer about {TOPICS[i]}.",
                    labeler_id="labeler-1", user_id=user, idempotency_key=f"demo-{i}",
                ),
                timeout=60,
            )  # fmt: skip
            if i == 0:
                # The gateway holds conversations to the encoding's rules and to what was served.
                wrong = feedback_pb2.ComparisonRequest(
                    messages=conversation(1), ranks=[1, 2], labeler_id="l", user_id=user,
                    idempotency_key="cmp-wrong",
                    responses=[feedback_pb2.ResponseRef(generation_id=distinct[t]) for t in ranked[:2]],
                )  # fmt: skip
                with pytest.raises(grpc.RpcError, match="served for a different conversation"):
                    feedback.SubmitComparison(wrong, timeout=60)
                robot = feedback_pb2.DemonstrationRequest(
                    messages=[M(role="robot", content="hi")], response="x", labeler_id="l",
                    user_id=user, idempotency_key="demo-robot",
                )  # fmt: skip
                with pytest.raises(grpc.RpcError, match=r"messages\[0\].role: unknown role"):
                    feedback.SubmitDemonstration(robot, timeout=60)

        cfg = TrainerConfig(
            bootstrap_servers=bootstrap, registry=registry, base_model=base, pretrain_corpus=CORPUS,
            device="cpu", metrics_port=0, progress="off",
            encoding=EncodingConfig(max_prompt_tokens=40, max_response_tokens=24),
            sft=SFTConfig(epochs=1, batch_size=8), rm=RMConfig(epochs=1, batch_prompts=4),
            ppo=PPOConfig(episodes=8, minibatch_size=4, iterations=1, max_new_tokens=12,
                          ema_decay=0.0, gamma_ptx=1.0, ptx_ratio=1),
            gates=GatesConfig(enabled=False),
            schedule=ScheduleConfig(sft_min_new=len(users), rm_min_new=len(users), ppo_min_new=8,
                                    max_rounds=3),
        )  # fmt: skip
        trainer = run(cfg, registry=CollectorRegistry(), serve_metrics=False)
        assert trainer.rounds_run == 3
        manifests = [
            checkpoint.verify(registry / role / v)
            for role in ("policy", "reward")
            for v in checkpoint.list_versions(registry, role)
        ]
        trained = [m for m in manifests if m.round_type != "init"]
        assert sorted(m.round_type for m in trained) == ["ppo", "rm", "sft"]
        spec = {"chat_template": True, "max_prompt_tokens": 40, "max_response_tokens": 24,
                "truncation_side": "left", "append_eos": True}  # fmt: skip
        assert all(m.encoding == spec for m in trained)
        rm = next(m for m in trained if m.round_type == "rm")
        assert rm.metrics["examples"] == len(users)  # every conversation's ranking

        # The PPO version is promoted; the server swaps to it and serves it with its encoding.
        ppo = next(m for m in trained if m.round_type == "ppo")
        deadline = time.monotonic() + 120
        while policy.pool.choose("someone") != ppo.version:
            assert time.monotonic() < deadline, "the new version was never served"
            time.sleep(0.1)
        rid = uuid.uuid4().hex
        after = infer.Generate(
            inference_pb2.GenerateRequest(messages=long_chat, request_id=rid), timeout=30
        )
        assert after.model_version == ppo.version
        assert after.prompt_tokens == 40  # truncated as its training truncated
        record = served_record(bootstrap, rid)
        tok = load_tokenizer(registry / "policy" / ppo.version)
        rendered = tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in long_chat],
            add_generation_prompt=True,
            tokenize=False,
        )
        assert record.rendered_prompt == rendered and list(record.messages) == long_chat
        assert record.model_version == ppo.version
    finally:
        channel.close()
        gateway.stop_in_thread()
        policy.stop_in_thread()
