"""Property-based fuzzing of every RPC of the API (hypothesis): inference, reward, feedback and
admin, against real servers on a broker of their own. The model servers serve the BPE chat
family, so plain prompts and conversations (``messages``) both go through its chat template.

Requests are generated from the request messages' descriptors alone, as a client built from
the .proto files would send them: any subset of fields set, strings from empty to 200,000
characters, every integer width at its edges, NaN and infinite floats, unknown enum values,
long repeated fields, and raw bytes that are no message at all. Properties, for every call:
the status is never UNKNOWN or INTERNAL (every failure is a status that says what was wrong),
no call outlives its deadline, and every server still answers health checks afterwards.
Bounded in time: a fixed number of examples per method (``RLHF_FUZZ_EXAMPLES``, 25), derived
deterministically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from rlhf import bus, models
from rlhf.config import load_config
from rlhf.kafka_local import LocalKafka
from rlhf.runtime import ServerRuntime
from rlhf.seed import seed_registry
from rlhf.v1 import admin_pb2, feedback_pb2, inference_pb2, reward_pb2
from services.feedback.config import KafkaConfig, ResolverConfig
from services.feedback.server import (
    SERVICES,
    FeedbackRuntimeConfig,
    FeedbackServerConfig,
    add_servicers,
)
from services.policy.config import PolicyServerConfig
from services.policy.server import PolicyServer
from services.reward.config import RewardServerConfig
from services.reward.server import RewardServer
from tests.conftest import start_broker

EXAMPLES = int(os.environ.get("RLHF_FUZZ_EXAMPLES", "25"))
DEADLINE_S = 10.0
KEY = "fuzz-key"
AUTH = [("authorization", f"Bearer {KEY}")]
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
T = FieldDescriptor

# --- requests from descriptors ---------------------------------------------------------------

TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300),
    st.sampled_from(["", " ", "\n\n", "a" * 257, "é" * 5000, "x" * 20_000, "y" * 200_000]),
)


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = sorted({low, high, 0, 1, min(high, 2**31), min(high, 2**31 - 1), max(low, -1)})
    return st.one_of(st.integers(low, high), st.integers(0, 10), st.sampled_from(edges))


SCALARS: dict[int, st.SearchStrategy[Any]] = {
    T.TYPE_STRING: TEXT,
    T.TYPE_BYTES: st.binary(max_size=64),
    T.TYPE_BOOL: st.booleans(),
    T.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
    T.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    T.TYPE_UINT32: _ints(32, False),
    T.TYPE_FIXED32: _ints(32, False),
    T.TYPE_INT32: _ints(32, True),
    T.TYPE_SINT32: _ints(32, True),
    T.TYPE_SFIXED32: _ints(32, True),
    T.TYPE_UINT64: _ints(64, False),
    T.TYPE_FIXED64: _ints(64, False),
    T.TYPE_INT64: _ints(64, True),
    T.TYPE_SINT64: _ints(64, True),
    T.TYPE_SFIXED64: _ints(64, True),
}


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == T.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if field.type == T.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-3, 1000))
    return SCALARS[field.type]


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of ``descriptor`` with a random subset of its fields set."""
    msg = message_factory.GetMessageClass(descriptor)()
    chosen = {
        oneof.name: draw(st.sampled_from([None, *oneof.fields]))
        for oneof in descriptor.oneofs
        if len(oneof.fields) > 1  # proto3 `optional` fields are one-field oneofs
    }
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.name in chosen:
            if chosen[oneof.name] is not field:
                continue
        elif not draw(st.booleans()):
            continue
        if depth > 3 and field.type == T.TYPE_MESSAGE:
            continue
        target = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields
            entries = draw(st.dictionaries(_value(key_field, depth), _value(value_field, depth),
                                           max_size=5))  # fmt: skip
            for key, value in entries.items():
                if value_field.type == T.TYPE_MESSAGE:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
        elif field.is_repeated:
            size = st.one_of(st.integers(0, 12), st.sampled_from([100, 2000]))
            values = draw(st.lists(_value(field, depth), min_size=0, max_size=12)) or []
            n = draw(size)
            values = (values * (n // max(1, len(values)) + 1))[:n] if values else []
            if field.type == T.TYPE_MESSAGE:
                for value in values:
                    target.add().CopyFrom(value)
            else:
                target.extend(values)
        elif field.type == T.TYPE_MESSAGE:
            target.CopyFrom(draw(_value(field, depth)))
        else:
            setattr(msg, field.name, draw(_value(field, depth)))
    return msg


def valid_requests(policy_version: str) -> dict[str, list[Message]]:
    """Valid requests per request type (a plain prompt and a chat conversation where the type
    takes one): mutating one reaches deeper than random messages, which validation rejects at
    the first field."""
    text = feedback_pb2.ResponseRef
    chat = [inference_pb2.ChatMessage(role="system", content="Be brief."),
            inference_pb2.ChatMessage(role="user", content="Name a color.")]  # fmt: skip
    comparison = feedback_pb2.ComparisonRequest(
        prompt="Name a color.", responses=[text(text="Blue."), text(text="Green.")], ranks=[1, 2],
        labeler_id="l", user_id="u", idempotency_key="k",
    )  # fmt: skip
    chat_comparison = feedback_pb2.ComparisonRequest(
        messages=chat, responses=[text(text="Blue."), text(text="Green.")], ranks=[1, 2],
        labeler_id="l", user_id="u", idempotency_key="k-chat",
    )  # fmt: skip
    demonstration = feedback_pb2.DemonstrationRequest(
        prompt="Name a color.", response="Blue.", labeler_id="l", user_id="u",
        idempotency_key="k",
    )  # fmt: skip
    chat_demonstration = feedback_pb2.DemonstrationRequest(
        messages=chat, response="Blue.", labeler_id="l", user_id="u", idempotency_key="k-chat"
    )
    policy = 1  # events_pb2.MODEL_ROLE_POLICY
    short = inference_pb2.GenerationParameters(max_new_tokens=2)
    valid = [
        inference_pb2.GenerateRequest(prompt="Hello", n=2, parameters=short),
        inference_pb2.GenerateRequest(messages=chat, n=2, parameters=short),
        reward_pb2.ScoreRequest(prompt="Hello", responses=["a", "b"]),
        reward_pb2.ScoreRequest(messages=chat, responses=["a", "b"]),
        comparison,
        chat_comparison,
        demonstration,
        chat_demonstration,
        feedback_pb2.FeedbackItem(comparison=comparison),
        feedback_pb2.FeedbackItem(demonstration=chat_demonstration),
        admin_pb2.ListVersionsRequest(role=policy),  # type: ignore[arg-type]
        admin_pb2.StatusRequest(),
        admin_pb2.PromoteRequest(role=policy, version=policy_version),  # type: ignore[arg-type]
        admin_pb2.RollbackRequest(role=policy),  # type: ignore[arg-type]
        admin_pb2.PinRequest(role=policy, version=policy_version),  # type: ignore[arg-type]
        admin_pb2.CanaryRequest(role=policy, version=policy_version, share=0.5),  # type: ignore[arg-type]
    ]
    by_type: dict[str, list[Message]] = {}
    for m in valid:
        by_type.setdefault(m.DESCRIPTOR.full_name, []).append(m)
    return by_type


def bodies(method: MethodDescriptor, valid: dict[str, list[Message]]) -> st.SearchStrategy[bytes]:
    """One request body: a valid request with some fields replaced by generated ones, a
    generated message, or bytes that are no message at all."""
    bases = valid[method.input_type.full_name]

    def mutate(base: Message, changes: Message) -> bytes:
        out = type(base)()
        out.CopyFrom(base)
        out.MergeFrom(changes)
        return out.SerializeToString()

    generated = messages(method.input_type)
    return st.one_of(
        st.builds(mutate, st.sampled_from(bases), generated),
        generated.map(lambda m: m.SerializeToString()),
        st.binary(max_size=64),
    )


# --- servers ----------------------------------------------------------------------------------


@dataclass
class Servers:
    ports: dict[str, int]  # full service name -> gRPC port
    valid: dict[str, list[Message]]  # request type -> valid requests


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    kafka = start_broker(tmp_path_factory.mktemp("fuzz-kafka"))
    yield kafka
    kafka.stop()


@pytest.fixture(scope="module")
def servers(broker: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("fuzz")
    # The chat family: plain prompts and conversations are both rendered with its template.
    models.init_models(models.InitConfig(out=str(root / "base"), tokenizer="bpe"))
    producer = bus.Producer(broker.bootstrap_servers, client_id="fuzz")
    seeded = seed_registry(root / "registry", root / "base", producer)
    producer.close()
    (policy_version,) = [m.version for m in seeded if m.role == "policy"]
    common = {
        "runtime.host": "127.0.0.1", "runtime.port": "0", "runtime.metrics_port": "-1",
        "runtime.http_port": "-1", "runtime.api_keys": f"{KEY} infer,feedback,admin",
        "runtime.grace_s": "1", "model.device": "cpu",
    }  # fmt: skip
    policy = PolicyServer(
        load_config(
            PolicyServerConfig,
            flags={
                **common,
                "model.registry": str(root / "registry"),
                "follow.bootstrap_servers": broker.bootstrap_servers,
                "publish.bootstrap_servers": broker.bootstrap_servers,
                "limits.max_input_tokens": "64",
                "limits.max_new_tokens": "8",
                "limits.default_max_new_tokens": "4",
                "engine.max_batch_size": "9",
            },
        ),
        CollectorRegistry(),
    )
    reward = RewardServer(
        load_config(
            RewardServerConfig,
            flags={
                **common,
                "model.path": str(Path(root / "base" / "reward")),
                "limits.max_responses": "16",
                "limits.max_prompt_tokens": "64",
                "limits.max_response_tokens": "64",
            },
        ),
        CollectorRegistry(),
    )
    feedback_config = FeedbackServerConfig(
        kafka=KafkaConfig(bootstrap_servers=broker.bootstrap_servers, ack_timeout_s=5.0),
        resolver=ResolverConfig(wait_s=0.2),
        runtime=FeedbackRuntimeConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            http_port=-1,
            api_keys=f"{KEY} feedback",
            grace_s=1,
        ),
    )
    feedback_registry = CollectorRegistry()
    feedback = ServerRuntime(feedback_config.runtime, feedback_registry, component="feedback")
    policy.start_in_thread()
    reward.start_in_thread()
    feedback.start_in_thread(add_servicers(feedback_config, feedback_registry, feedback), SERVICES)
    assert feedback.wait_serving("rlhf.v1.FeedbackService", 120)
    assert policy.models.follower is not None and policy.models.follower.caught_up
    ports = {
        "rlhf.v1.InferenceService": policy.runtime.port,
        "rlhf.v1.AdminService": policy.runtime.port,
        "rlhf.v1.RewardService": reward.runtime.port,
        "rlhf.v1.FeedbackService": feedback.port,
    }
    yield Servers(ports, valid_requests(policy_version))
    feedback.stop_in_thread()
    reward.stop_in_thread()
    policy.stop_in_thread()


METHODS = [
    method
    for file in (inference_pb2, reward_pb2, feedback_pb2, admin_pb2)
    for service in file.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


def call(channel: grpc.Channel, method: MethodDescriptor, bodies: list[bytes]) -> grpc.StatusCode:
    """Calls ``method`` with raw ``bodies`` (one, or a stream); its final status."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kinds = (method.client_streaming, method.server_streaming)
    try:
        if kinds == (False, False):
            channel.unary_unary(path)(bodies[0], metadata=AUTH, timeout=DEADLINE_S)
        elif kinds == (False, True):
            for _ in channel.unary_stream(path)(bodies[0], metadata=AUTH, timeout=DEADLINE_S):
                pass
        elif kinds == (True, False):
            channel.stream_unary(path)(iter(bodies), metadata=AUTH, timeout=DEADLINE_S)
        else:
            for _ in channel.stream_stream(path)(iter(bodies), metadata=AUTH, timeout=DEADLINE_S):
                pass
    except grpc.RpcError as exc:
        assert exc.code() not in FORBIDDEN, f"{path}: {exc.code().name}: {exc.details()}"
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_every_rpc_answers_every_request_with_a_meaningful_status(
    servers: Servers, method: MethodDescriptor
) -> None:
    service = method.containing_service.full_name
    port = servers.ports[service]
    seen: set[grpc.StatusCode] = set()
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        one = bodies(method, servers.valid)
        body_lists = (
            st.lists(one, min_size=0, max_size=5)
            if method.client_streaming
            else one.map(lambda b: [b])
        )

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(body_lists)
        def fuzz(payload: list[bytes]) -> None:
            started = time.monotonic()
            seen.add(call(channel, method, payload))
            assert time.monotonic() - started < DEADLINE_S + 3, "a call outlived its deadline"

        fuzz()
        # The server still answers health checks (and this service is still SERVING).
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert seen  # something was sent
