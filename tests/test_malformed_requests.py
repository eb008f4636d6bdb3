"""Malformed request bodies on every method path of the API: a caller without a valid key gets
UNAUTHENTICATED before anything is parsed; an authenticated malformed body gets
INVALID_ARGUMENT naming the request type, never UNKNOWN."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from rlhf.runtime import RuntimeConfig, Scope, ServerRuntime
from rlhf.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

KEYS = {Scope.INFER: "k-infer-1", Scope.FEEDBACK: "k-feedback-1", Scope.ADMIN: "k-admin-1"}
SCOPES = {
    "rlhf.v1.InferenceService": Scope.INFER,
    "rlhf.v1.RewardService": Scope.INFER,
    "rlhf.v1.FeedbackService": Scope.FEEDBACK,
    "rlhf.v1.AdminService": Scope.ADMIN,
}
DESCRIPTORS = [
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    reward_pb2.DESCRIPTOR.services_by_name["RewardService"],
    feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"],
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
]
METHODS = [method for service in DESCRIPTORS for method in service.methods]
# A field tag with wire type 7 (none exists), a truncated varint, a length past the end.
MALFORMED = [b"\xff", b"\x08", b"\x0a\x05ab"]


class CountingFeedback(feedback_pb2_grpc.FeedbackServiceServicer):
    """Reads a bulk stream to its end (the base servicer would answer without reading)."""

    async def SubmitBulk(self, request_iterator, context):
        n = 0
        async for _item in request_iterator:
            n += 1
        return feedback_pb2.BulkResponse(accepted=n)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerRuntime]:
    """Every service of the API, registered with its generated handlers (the servicers are
    the generated bases: a call that gets through parsing answers UNIMPLEMENTED, except the
    bulk stream, which is read to its end)."""
    config = RuntimeConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        api_keys="; ".join(f"{key} {scope.value}" for scope, key in KEYS.items()),
        grace_s=0.5,
    )
    runtime = ServerRuntime(config, CollectorRegistry(), component="malformed")

    def add(server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            inference_pb2_grpc.InferenceServiceServicer(), server
        )
        reward_pb2_grpc.add_RewardServiceServicer_to_server(
            reward_pb2_grpc.RewardServiceServicer(), server
        )
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(CountingFeedback(), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            admin_pb2_grpc.AdminServiceServicer(), server
        )

    runtime.start_in_thread(add, SCOPES)
    yield runtime
    runtime.stop_in_thread()


def call_raw(channel: grpc.Channel, method, body: bytes, key: str | None) -> grpc.StatusCode:
    """Sends ``body`` as it is to ``method``; the call's status code."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = [("authorization", f"Bearer {key}")] if key else None
    kinds = (method.client_streaming, method.server_streaming)
    try:
        if kinds == (False, False):
            channel.unary_unary(path)(body, metadata=metadata, timeout=10)
        elif kinds == (False, True):
            list(channel.unary_stream(path)(body, metadata=metadata, timeout=10))
        elif kinds == (True, False):
            channel.stream_unary(path)(iter([body]), metadata=metadata, timeout=10)
        else:
            list(channel.stream_stream(path)(iter([body]), metadata=metadata, timeout=10))
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_malformed_bodies(server: ServerRuntime, method) -> None:
    key = KEYS[SCOPES[method.containing_service.full_name]]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for body in MALFORMED:
            assert call_raw(channel, method, body, None) == grpc.StatusCode.UNAUTHENTICATED
            assert call_raw(channel, method, body, "k-wrong") == grpc.StatusCode.UNAUTHENTICATED
            assert call_raw(channel, method, body, key) == grpc.StatusCode.INVALID_ARGUMENT, body
        # A well-formed (empty) body gets through parsing to the servicer.
        expected = grpc.StatusCode.OK if method.client_streaming else grpc.StatusCode.UNIMPLEMENTED
        assert call_raw(channel, method, b"", key) == expected


def test_the_message_names_the_type_and_invalid_utf8_is_malformed(server: ServerRuntime) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        generate = channel.unary_unary("/rlhf.v1.InferenceService/Generate")
        metadata = [("authorization", f"Bearer {KEYS[Scope.INFER]}")]
        # prompt (field 1, a string) holding bytes that are not UTF-8.
        with pytest.raises(grpc.RpcError) as err:
            generate(b"\x0a\x02\xff\xfe", metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "rlhf.v1.GenerateRequest" in err.value.details()
        # The second message of a client stream is malformed: the stream fails as a whole.
        bulk = channel.stream_unary("/rlhf.v1.FeedbackService/SubmitBulk")
        item = feedback_pb2.FeedbackItem(
            demonstration=feedback_pb2.DemonstrationRequest(prompt="p")
        ).SerializeToString()
        with pytest.raises(grpc.RpcError) as err:
            bulk(
                iter([item, b"\xff"]),
                metadata=[("authorization", f"Bearer {KEYS[Scope.FEEDBACK]}")],
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "rlhf.v1.FeedbackItem" in err.value.details()
