"""The common server runtime over real gRPC on localhost: auth, health, reflection, metrics,
message limits and graceful shutdown. The services here are small real implementations of
the project's protos that exist only to exercise the runtime."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from rlhf import auth
from rlhf.runtime import KeyStore, RuntimeConfig, Scope, ServerRuntime, parse_api_keys
from rlhf.v1 import inference_pb2, inference_pb2_grpc, reward_pb2, reward_pb2_grpc

INFER_KEY = "k-infer-0123456789"
ADMIN_KEY = "k-admin-0123456789"
FEEDBACK_KEY = "k-feedback-0123456789"


class LengthScorer(reward_pb2_grpc.RewardServiceServicer):
    """Scores a response by its length."""

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        if not request.responses:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "responses: must not be empty")
        return reward_pb2.ScoreResponse(
            rewards=[float(len(r)) for r in request.responses], model_version="len"
        )


class CharStreamer(inference_pb2_grpc.InferenceServiceServicer):
    """Streams the prompt back one character per event; a prompt of 'wait' blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waiting = threading.Event()

    async def GenerateStream(
        self, request, context
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        if request.prompt == "wait":
            self.waiting.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait)
        for ch in request.prompt:
            yield inference_pb2.GenerateStreamResponse(token=inference_pb2.Token(text=ch))


def _start(
    config: RuntimeConfig, streamer: CharStreamer | None = None, stopped: list | None = None
):
    runtime = ServerRuntime(config, CollectorRegistry(), component="testsvc")

    def add(server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(LengthScorer(), server)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            streamer or CharStreamer(), server
        )
        if stopped is not None:
            runtime.on_stop(lambda: stopped.append("hook"))

    runtime.start_in_thread(
        add, {"rlhf.v1.RewardService": Scope.INFER, "rlhf.v1.InferenceService": Scope.INFER}
    )
    return runtime


@pytest.fixture
def server() -> Iterator[ServerRuntime]:
    config = RuntimeConfig(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        api_keys=f"{INFER_KEY} infer; {ADMIN_KEY} admin",
        max_message_bytes=64 * 1024,
        grace_s=5.0,
    )
    runtime = _start(config)
    yield runtime
    runtime.stop_in_thread()


def _channel(runtime: ServerRuntime) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{runtime.port}")


def _score(
    channel: grpc.Channel, key: str | None, responses=("a", "bcd")
) -> reward_pb2.ScoreResponse:
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    metadata = [("authorization", f"Bearer {key}")] if key else None
    return stub.Score(
        reward_pb2.ScoreRequest(prompt="p", responses=list(responses)),
        metadata=metadata,
        timeout=10,
    )


def test_auth_scopes(server: ServerRuntime) -> None:
    with _channel(server) as channel:
        assert list(_score(channel, INFER_KEY).rewards) == [1.0, 3.0]
        # The alternative header is accepted too.
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        ok = stub.Score(
            reward_pb2.ScoreRequest(prompt="p", responses=["xy"]),
            metadata=[("x-api-key", INFER_KEY)],
            timeout=10,
        )
        assert list(ok.rewards) == [2.0]
        cases = [
            (None, grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
            ("nope", grpc.StatusCode.UNAUTHENTICATED, "invalid API key"),
            (INFER_KEY[:-1], grpc.StatusCode.UNAUTHENTICATED, "invalid API key"),
            (ADMIN_KEY, grpc.StatusCode.PERMISSION_DENIED, "scope 'infer'"),
        ]
        for key, code, message in cases:
            with pytest.raises(grpc.RpcError) as err:
                _score(channel, key)
            assert err.value.code() == code, key
            assert message in err.value.details()
        # A servicer's own error passes through unchanged.
        with pytest.raises(grpc.RpcError) as err:
            _score(channel, INFER_KEY, responses=())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "responses" in err.value.details()
        # The server kept serving through all of that.
        assert list(_score(channel, INFER_KEY).rewards) == [1.0, 3.0]


def test_health_and_reflection_need_no_key(server: ServerRuntime) -> None:
    with _channel(server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "rlhf.v1.RewardService", "rlhf.v1.InferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert {
            "rlhf.v1.RewardService",
            "rlhf.v1.InferenceService",
            "grpc.health.v1.Health",
        } <= names
        # Reflection serves the schema too, so grpcurl works without the .proto files.
        replies = list(
            refl.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="rlhf.v1.RewardService"
                        )
                    ]
                )
            )
        )
        assert replies[0].file_descriptor_response.file_descriptor_proto


def test_metrics_scrape_counts_by_method_and_code(server: ServerRuntime) -> None:
    with _channel(server) as channel:
        _score(channel, INFER_KEY)
        with pytest.raises(grpc.RpcError):
            _score(channel, None)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        events = list(
            stub.GenerateStream(
                inference_pb2.GenerateRequest(prompt="abc"),
                metadata=[("authorization", f"Bearer {INFER_KEY}")],
                timeout=10,
            )
        )
        assert "".join(e.token.text for e in events) == "abc"
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    grpc_calls = 'rlhf_testsvc_requests_total{code="%s",method="%s",protocol="grpc"} 1.0'
    assert grpc_calls % ("OK", "rlhf.v1.RewardService/Score") in body
    assert grpc_calls % ("UNAUTHENTICATED", "rlhf.v1.RewardService/Score") in body
    assert grpc_calls % ("OK", "rlhf.v1.InferenceService/GenerateStream") in body
    assert "rlhf_testsvc_request_duration_seconds_bucket" in body


def test_oversized_message_is_refused_and_server_keeps_serving(server: ServerRuntime) -> None:
    with _channel(server) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _score(channel, INFER_KEY, responses=["x" * (100 * 1024)])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "message larger than max" in err.value.details()
        assert list(_score(channel, INFER_KEY).rewards) == [1.0, 3.0]


def test_graceful_shutdown_drains_in_flight_calls() -> None:
    streamer = CharStreamer()
    stopped: list[str] = []
    config = RuntimeConfig(host="127.0.0.1", port=0, metrics_port=-1, grace_s=10.0)
    runtime = _start(config, streamer, stopped)
    channel = _channel(runtime)
    stopper = threading.Thread(target=runtime.stop_in_thread)
    try:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        call = stub.GenerateStream(inference_pb2.GenerateRequest(prompt="wait"), timeout=30)
        assert streamer.waiting.wait(10)
        # Opened before the shutdown: a draining server takes no new calls.
        watch = health.Watch(
            health_pb2.HealthCheckRequest(service="rlhf.v1.InferenceService"), timeout=10
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper.start()
        # Health turns NOT_SERVING as soon as draining starts, so balancers stop sending.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert stopped == []  # hooks wait for in-flight calls
        streamer.release.set()
        assert "".join(e.token.text for e in call) == "wait"  # the in-flight call completed
        stopper.join(30)
        assert not stopper.is_alive()
        assert stopped == ["hook"]
    finally:
        streamer.release.set()  # never leave the servicer's executor thread blocked
        channel.close()


def test_without_keys_auth_is_off_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    config = RuntimeConfig(host="127.0.0.1", port=0, metrics_port=-1)
    with caplog.at_level("WARNING", logger="rlhf.runtime"):
        runtime = _start(config)
    try:
        assert "NO API KEYS CONFIGURED" in caplog.text
        with _channel(runtime) as channel:
            assert list(_score(channel, None).rewards) == [1.0, 3.0]
    finally:
        runtime.stop_in_thread()
    with pytest.raises(ValueError, match="require_auth"):
        ServerRuntime(
            RuntimeConfig(port=0, metrics_port=-1, require_auth=True),
            CollectorRegistry(),
            component="x",
        )


def test_api_keys_from_file_and_inline(tmp_path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        f"# operators\n{ADMIN_KEY} admin,infer\n\n{FEEDBACK_KEY} feedback  # labelers\n"
    )
    store = KeyStore.from_settings(f"{INFER_KEY} infer", str(keys_file))
    assert store.lookup(INFER_KEY) == {Scope.INFER}
    assert store.lookup(ADMIN_KEY) == {Scope.ADMIN, Scope.INFER}
    assert store.lookup(FEEDBACK_KEY) == {Scope.FEEDBACK}
    assert store.lookup("") is None
    with pytest.raises(ValueError, match="unknown scope 'root'"):
        parse_api_keys("k root", where="api_keys")
    with pytest.raises(ValueError, match="expected 'KEY SCOPE"):
        RuntimeConfig(api_keys="lonely-key")
    with pytest.raises(ValueError, match="port"):
        RuntimeConfig(port=70000)


def test_api_keys_file_is_reloaded_without_a_restart(tmp_path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{INFER_KEY} infer\n")
    runtime = _start(
        RuntimeConfig(host="127.0.0.1", port=0, metrics_port=-1, api_keys_file=str(keys_file))
    )
    rotated = "k-rotated-0123456789"

    def code(key: str) -> grpc.StatusCode:
        try:
            _score(channel, key)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    try:
        with _channel(runtime) as channel:
            assert code(INFER_KEY) == grpc.StatusCode.OK
            assert code(rotated) == grpc.StatusCode.UNAUTHENTICATED
            tmp = tmp_path / "keys.new"  # written elsewhere and renamed, as a Secret update is
            tmp.write_text(f"{rotated} infer\n")
            tmp.replace(keys_file)
            deadline = time.monotonic() + 20
            while code(rotated) != grpc.StatusCode.OK:
                assert time.monotonic() < deadline, "the new key never worked"
                time.sleep(0.1)
            assert code(INFER_KEY) == grpc.StatusCode.UNAUTHENTICATED  # revoked
    finally:
        runtime.stop_in_thread()


def test_a_broken_or_empty_keys_file_keeps_the_keys_in_force(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(auth, "CHECK_INTERVAL_S", 0.0)
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{INFER_KEY} infer\n")
    store = KeyStore.from_settings("", str(keys_file))
    keys_file.write_text(f"{ADMIN_KEY} root\n")  # an unknown scope: not loaded
    assert store.lookup(INFER_KEY) == {Scope.INFER}
    assert store.lookup(ADMIN_KEY) is None
    keys_file.write_text("# everyone left\n")  # no key: auth must not silently turn off
    assert store.lookup(INFER_KEY) == {Scope.INFER}
    assert store.enabled
    keys_file.write_text(f"{ADMIN_KEY} admin\n")
    assert store.lookup(ADMIN_KEY) == {Scope.ADMIN}
    assert store.lookup(INFER_KEY) is None


def test_health_over_http_on_the_metrics_port(server: ServerRuntime) -> None:
    """What HTTP(S)-only probes see: 200 while a service is SERVING, 503 with the failing
    conditions while it is not, 404 for a service the server does not have."""
    base = f"http://127.0.0.1:{server.metrics_port}/health"

    def get(path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(base + path, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    assert get("") == (200, {"service": "", "status": "SERVING", "failing": {}})
    assert get("/rlhf.v1.RewardService")[0] == 200
    server.set_condition("rlhf.v1.RewardService", "model", False, "no model loaded")
    try:
        code, body = get("/rlhf.v1.RewardService")
        assert (code, body["failing"]) == (503, {"model": "no model loaded"})
        with _channel(server) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="rlhf.v1.RewardService"), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.set_condition("rlhf.v1.RewardService", "model", True)
    assert get("/rlhf.v1.RewardService")[0] == 200
    assert get("/rlhf.v1.Nope")[0] == 404
