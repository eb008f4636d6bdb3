"""The policy server over real gRPC on localhost, publishing to a real Kafka broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from rlhf import bus, topics
from rlhf.config import load_config
from rlhf.kafka_local import free_port
from rlhf.models import build_tiny
from rlhf.split import split_for_user
from rlhf.v1 import events_pb2, inference_pb2, inference_pb2_grpc
from services.policy.config import (
    EngineConfig,
    LimitsConfig,
    ModelConfig,
    PolicyRuntimeConfig,
    PolicyServerConfig,
    PublishConfig,
    parse_cpus,
)
from services.policy.engines import cpu_list
from services.policy.server import PolicyServer

INFER = [("authorization", "Bearer infer-key-1")]
ADMIN = [("authorization", "Bearer admin-key-1")]
VERSION = "policy-test-v1"
P = inference_pb2.GenerationParameters


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("policy") / "tiny", seed=0)


def make_config(
    model_dir: Path, bootstrap: str = "", max_n: int = 9, **engine: int
) -> PolicyServerConfig:
    return PolicyServerConfig(
        model=ModelConfig(path=str(model_dir), version=VERSION, device="cpu"),
        limits=LimitsConfig(
            max_input_tokens=64, max_new_tokens=1500, default_max_new_tokens=16, max_n=max_n
        ),
        engine=EngineConfig(**engine),
        publish=PublishConfig(bootstrap_servers=bootstrap, ack_timeout_s=5.0, max_backoff_s=1.0),
        runtime=PolicyRuntimeConfig(
            host="127.0.0.1",
            port=0,
            metrics_host="127.0.0.1",
            metrics_port=0,
            http_host="127.0.0.1",
            http_port=0,
            api_keys="infer-key-1 infer; admin-key-1 admin",
            max_message_bytes=256 * 1024,
            grace_s=5.0,
        ),
    )


def start(config: PolicyServerConfig) -> PolicyServer:
    server = PolicyServer(config, CollectorRegistry())
    server.start_in_thread()
    return server


@pytest.fixture(scope="module")
def server(model_dir: Path, kafka) -> Iterator[PolicyServer]:
    srv = start(make_config(model_dir, kafka.bootstrap_servers, max_batch_size=16))
    yield srv
    srv.stop_in_thread()


@pytest.fixture(scope="module")
def stub(server: PolicyServer) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.runtime.port}") as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def generate(stub, timeout: float = 30, metadata=INFER, **kwargs) -> inference_pb2.GenerateResponse:
    return stub.Generate(
        inference_pb2.GenerateRequest(**kwargs), metadata=metadata, timeout=timeout
    )


def test_generate_n_samples_with_logprobs(stub) -> None:
    params = P(max_new_tokens=10, seed=7, temperature=0.8)
    reply = generate(
        stub, prompt="Hello", n=4, return_logprobs=True, parameters=params, request_id="r-1"
    )
    assert reply.request_id == "r-1"
    assert reply.model_version == VERSION
    assert reply.prompt_tokens == 6  # BOS + 5 bytes
    assert [s.index for s in reply.samples] == [0, 1, 2, 3]
    assert len({s.generation_id for s in reply.samples}) == 4
    for s in reply.samples:
        # A sampled token of the random model may be EOS (1 in 259); otherwise the limit ends it.
        if s.finish_reason == inference_pb2.FINISH_REASON_LENGTH:
            assert s.generated_tokens == 10
        else:
            assert s.finish_reason == inference_pb2.FINISH_REASON_EOS_TOKEN
        assert s.generated_tokens == len(s.tokens)
        assert all(t.HasField("logprob") and t.logprob <= 0 for t in s.tokens)
    # The same seed reproduces the samples; another seed does not.
    again = generate(stub, prompt="Hello", n=4, parameters=params)
    assert [s.text for s in again.samples] == [s.text for s in reply.samples]
    assert not again.samples[0].tokens  # no logprobs unless asked
    other = generate(
        stub, prompt="Hello", n=4, parameters=P(max_new_tokens=10, seed=8, temperature=0.8)
    )
    assert [s.text for s in other.samples] != [s.text for s in reply.samples]
    # Defaults: greedy, default_max_new_tokens; greedy samples are identical.
    greedy = generate(stub, prompt="Hello", n=2)
    assert greedy.samples[0].generated_tokens == 16
    assert greedy.samples[0].text == greedy.samples[1].text


def test_stop_sequence(stub) -> None:
    free = generate(stub, prompt="stop", parameters=P(max_new_tokens=12)).samples[0]
    stop = free.text[2:4]
    reply = generate(stub, prompt="stop", parameters=P(max_new_tokens=12, stop=[stop]))
    s = reply.samples[0]
    assert s.finish_reason == inference_pb2.FINISH_REASON_STOP_SEQUENCE
    assert s.text.endswith(stop) and free.text.startswith(s.text)


def test_stream(stub) -> None:
    request = inference_pb2.GenerateRequest(
        prompt="stream me",
        n=2,
        return_logprobs=True,
        parameters=P(max_new_tokens=6, do_sample=True, seed=3),
    )
    events = list(stub.GenerateStream(request, metadata=INFER, timeout=30))
    finished = {}
    text: dict[int, str] = {0: "", 1: ""}
    for e in events:
        assert e.model_version == VERSION and e.request_id
        assert e.token.HasField("logprob")
        text[e.index] += e.token.text
        if e.HasField("finished"):
            finished[e.index] = e.finished
    assert sorted(finished) == [0, 1]
    assert len(events) == sum(f.generated_tokens for f in finished.values())
    for i, sample in finished.items():
        assert sample.index == i and 1 <= sample.generated_tokens <= 6
        assert [t.id for t in sample.tokens] == [e.token.id for e in events if e.index == i]
    # Streaming and unary calls with the same seed serve the same samples.
    unary = generate(
        stub, prompt="stream me", n=2, parameters=P(max_new_tokens=6, do_sample=True, seed=3)
    )
    assert [s.text for s in unary.samples] == [finished[0].text, finished[1].text]


@pytest.mark.parametrize(
    ("request_kwargs", "code", "field"),
    [
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt": "x" * 200}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt": "hi", "n": 10}, grpc.StatusCode.INVALID_ARGUMENT, "n must be in 1..9"),
        (
            {"prompt": "hi", "parameters": P(temperature=-1)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            {"prompt": "hi", "parameters": P(temperature=0)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        ({"prompt": "hi", "parameters": P(top_p=0)}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt": "hi", "parameters": P(top_p=1.5)}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (
            {"prompt": "hi", "parameters": P(max_new_tokens=1501)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_new_tokens",
        ),
        (
            {"prompt": "hi", "parameters": P(max_new_tokens=0)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_new_tokens",
        ),
        (
            {"prompt": "hi", "parameters": P(repetition_penalty=0)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "repetition_penalty",
        ),
        ({"prompt": "hi", "parameters": P(stop=[""])}, grpc.StatusCode.INVALID_ARGUMENT, "stop"),
        ({"prompt": "hi", "model_version": "nope"}, grpc.StatusCode.NOT_FOUND, "model_version"),
        ({"prompt": "x" * 300_000}, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ],
)
def test_bad_input(stub, request_kwargs, code, field) -> None:
    for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
        with pytest.raises(grpc.RpcError) as err:
            call(inference_pb2.GenerateRequest(**request_kwargs), metadata=INFER, timeout=30)
        assert err.value.code() == code
        assert field in err.value.details()
    assert generate(stub, prompt="still serving").samples[0].generated_tokens == 16


def test_auth(stub) -> None:
    for metadata, code in [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ([("authorization", "Bearer wrong")], grpc.StatusCode.UNAUTHENTICATED),
        (ADMIN, grpc.StatusCode.PERMISSION_DENIED),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, prompt="hi", metadata=metadata)
        assert err.value.code() == code
    assert generate(stub, prompt="hi").model_version == VERSION


def test_cancellation_and_deadline_stop_generation(server: PolicyServer, stub) -> None:
    engine = server.engine
    assert engine is not None
    long = inference_pb2.GenerateRequest(prompt="long", parameters=P(max_new_tokens=1500))
    call = stub.GenerateStream(long, metadata=INFER, timeout=60)
    next(call)
    call.cancel()
    assert engine.wait_idle(10)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(long, metadata=INFER, timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert engine.wait_idle(10)

    def metric(name: str, **labels: str) -> float:
        return server.registry.get_sample_value(f"rlhf_policy_{name}", labels) or 0.0

    aborted = sum(metric("requests_aborted_total", reason=r) for r in ("cancelled", "deadline"))
    assert aborted == 2
    assert metric("generated_tokens_total") < 3000


def test_health_reflection_and_metrics(server: PolicyServer, stub) -> None:
    generate(stub, prompt="metrics")
    with grpc.insecure_channel(f"127.0.0.1:{server.runtime.port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="rlhf.v1.InferenceService"), timeout=10
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        assert "rlhf.v1.InferenceService" in {s.name for s in reply.list_services_response.service}
    url = f"http://127.0.0.1:{server.runtime.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in [
        'rlhf_policy_requests_total{code="OK",method="rlhf.v1.InferenceService/Generate",protocol="grpc"}',
        "rlhf_policy_request_duration_seconds_bucket",
        "rlhf_policy_time_to_first_token_seconds_count",
        "rlhf_policy_time_per_output_token_seconds_count",
        "rlhf_policy_generated_tokens_total",
        "rlhf_policy_queue_size",
        "rlhf_policy_batch_size_bucket",
        "rlhf_policy_prompt_tokens_bucket",
        "rlhf_policy_generation_tokens_bucket",
        "rlhf_policy_publish_dropped_total",
        f'rlhf_policy_model_info{{version="{VERSION}"}} 1.0',
    ]:
        assert line in body, line


def _read_prompts(
    bootstrap: str, request_ids: set[str], timeout_s: float = 60
) -> dict[str, events_pb2.ServedGeneration]:
    consumer = bus.Consumer(
        bootstrap, [topics.PROMPTS], group_id=f"test-{uuid.uuid4().hex}", client_id="test-policy"
    )
    found: dict[str, events_pb2.ServedGeneration] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while request_ids - found.keys() and time.monotonic() < deadline:
            for record in consumer.poll(timeout_s=1.0):
                if record.value.request_id in request_ids:
                    found[record.value.request_id] = record.value
    finally:
        consumer.close()
    return found


def test_served_generations_reach_kafka(kafka, stub) -> None:
    rid = uuid.uuid4().hex
    reply = generate(
        stub,
        prompt="to kafka",
        n=2,
        user_id="user-42",
        request_id=rid,
        parameters=P(max_new_tokens=5, seed=1, top_k=20),
    )
    event = _read_prompts(kafka.bootstrap_servers, {rid})[rid]
    assert event.event_id and event.prompt == "to kafka" and event.user_id == "user-42"
    assert event.split == split_for_user("user-42", 0.05, 0.05) != events_pb2.SPLIT_UNSPECIFIED
    assert event.model_version == VERSION
    assert (
        event.parameters.max_new_tokens == 5
        and event.parameters.top_k == 20
        and event.parameters.do_sample
    )
    assert [s.generation_id for s in event.samples] == [s.generation_id for s in reply.samples]
    assert [s.text for s in event.samples] == [s.text for s in reply.samples]
    for s, served in zip(event.samples, reply.samples, strict=True):
        assert len(s.token_ids) == len(s.logprobs) == served.generated_tokens


def test_keeps_serving_while_broker_is_down(model_dir: Path, private_kafka) -> None:
    server = start(make_config(model_dir, private_kafka.bootstrap_servers))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.runtime.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            before = uuid.uuid4().hex
            generate(stub, prompt="broker up", request_id=before)
            assert before in _read_prompts(private_kafka.bootstrap_servers, {before})
            private_kafka.stop()
            during = [uuid.uuid4().hex for _ in range(3)]
            for rid in during:
                start_t = time.perf_counter()
                reply = generate(stub, prompt="broker down", request_id=rid, timeout=10)
                assert reply.samples[0].generated_tokens == 16
                assert time.perf_counter() - start_t < 2.0  # no waiting on Kafka
            assert server.publisher is not None and server.publisher.pending() >= 1
            # Once the broker is back, the buffered generations are delivered.
            private_kafka.start()
            assert (
                set(during)
                <= _read_prompts(private_kafka.bootstrap_servers, set(during), timeout_s=90).keys()
            )
    finally:
        server.stop_in_thread()
    assert server.publisher.dropped.labels("buffer_full")._value.get() == 0


def test_queue_full_is_resource_exhausted(model_dir: Path) -> None:
    server = start(make_config(model_dir, max_n=1, max_batch_size=1, max_queue=1))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.runtime.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            long = inference_pb2.GenerateRequest(prompt="busy", parameters=P(max_new_tokens=1500))
            running = stub.GenerateStream(long, metadata=INFER, timeout=60)
            next(running)  # holds the only batch slot
            queued = stub.GenerateStream(long, metadata=INFER, timeout=60)
            assert server.engine is not None and server.engine.wait_queued(1, 10)
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(long, metadata=INFER, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue" in err.value.details()
            # The HTTP doors say so in their own shapes: 429 for OpenAI and TGI clients.
            url = f"http://127.0.0.1:{server.runtime.http_port}"
            auth = {"authorization": "Bearer infer-key-1"}
            openai = httpx2.post(
                f"{url}/v1/completions",
                json={"model": "policy", "prompt": "busy", "max_tokens": 1500},
                headers=auth,
            )
            assert openai.status_code == 429
            assert openai.json()["error"]["type"] == "rate_limit_error"
            tgi = httpx2.post(
                f"{url}/generate",
                json={"inputs": "busy", "parameters": {"max_new_tokens": 1500}},
                headers=auth,
            )
            assert tgi.status_code == 429 and tgi.json()["error_type"] == "overloaded"
            running.cancel()
            next(queued)  # admitted once the slot is free
            queued.cancel()
    finally:
        server.stop_in_thread()


def test_cli_serves_and_stops_on_sigterm(model_dir: Path, tmp_path: Path) -> None:
    """The CLI serves a request, with the engine's step thread pinned to the CPUs of
    ``--engine.cpus`` and every other thread to the others, and stops on SIGTERM."""
    port = free_port()
    allowed = os.sched_getaffinity(0)
    engine_cpus = {max(allowed)}
    config_file = tmp_path / "policy.yaml"
    config_file.write_text(
        f"model:\n  path: {model_dir}\nruntime:\n  host: 127.0.0.1\n  metrics_port: -1\n"
    )
    env = dict(
        os.environ,
        RLHF_POLICY_RUNTIME__PORT=str(port),
        RLHF_POLICY_RUNTIME__API_KEYS="cli-key infer",
    )
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlhf",
            "serve",
            "policy",
            "--config",
            str(config_file),
            "--model.version",
            "cli-v",
            "--engine.cpus",
            str(max(allowed)),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=90)
            # The port opens before the model is loaded: wait until health says SERVING.
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="rlhf.v1.InferenceService")
            deadline = time.monotonic() + 90
            while health.Check(check, timeout=10).status != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "the policy server never became SERVING"
                time.sleep(0.2)
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = inference_pb2.GenerateRequest(prompt="cli")
            reply = stub.Generate(
                request, metadata=[("x-api-key", "cli-key")], timeout=30, wait_for_ready=True
            )
            assert reply.model_version == "cli-v"
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [
            int(pid)
            for pid in children
            if b"services.policy.engines.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(workers) == 1
        # The server's own threads (gRPC, event loop, pipe reader) and the worker's pipe reader
        # (its main thread) keep off the engine's CPUs, unless they are all there is; the
        # engine's step thread computes on them.
        expected = (allowed - engine_cpus) or allowed
        worker = workers[0]
        threads = [int(t) for t in os.listdir(f"/proc/{worker}/task")]
        on_engine = [t for t in threads if os.sched_getaffinity(t) == engine_cpus]
        assert on_engine, "no thread of the worker computes on the engine's CPUs"
        if len(allowed) > 1:
            assert os.sched_getaffinity(worker) == expected and worker not in on_engine
        assert all(os.sched_getaffinity(t) in (engine_cpus, expected) for t in threads)
        server = {int(t) for t in os.listdir(f"/proc/{proc.pid}/task")}
        assert all(os.sched_getaffinity(t) == expected for t in server)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "policy server stopped" in output


@pytest.mark.parametrize(
    ("cpus", "message"),
    [
        ("two", "'two' is neither a CPU number nor a range like 2-7"),
        ("3-1", "'3-1' is not a range of CPUs 0..8191"),
        ("0-100000", "'0-100000' is not a range of CPUs 0..8191"),
        ("unavailable", "are not available to this process"),
    ],
)
def test_cli_refuses_engine_cpus_it_cannot_use(model_dir: Path, cpus: str, message: str) -> None:
    """A malformed ``--engine.cpus``, or CPUs this process may not use: exit status 2 and a
    message naming the setting, before any model is loaded."""
    if cpus == "unavailable":
        cpus = str(max(os.sched_getaffinity(0)) + 1)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(
        [
            sys.executable, "-m", "rlhf", "serve", "policy", "--model.path", str(model_dir),
            "--runtime.port", str(free_port()), "--runtime.metrics-port", "-1",
            "--engine.cpus", cpus,
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "engine.cpus" in done.stderr and message in done.stderr
    assert "loaded" not in done.stderr


def test_vllm_ranks_need_a_cpu_each() -> None:
    flags = {
        "model.path": "/m", "engine.kind": "vllm", "vllm.tensor_parallel_size": "2",
        "engine.cpus": "0",
    }  # fmt: skip
    with pytest.raises(ValueError, match="engine.cpus names 1 CPUs for vllm.tensor_parallel_size"):
        load_config(PolicyServerConfig, flags=flags)
    assert load_config(PolicyServerConfig, flags=flags | {"engine.cpus": "0-1"}).engine.cpus


def test_cpu_lists_read_and_write_the_same_form() -> None:
    assert parse_cpus(" 3, 0-1 ,7-7,") == {0, 1, 3, 7}
    assert parse_cpus("") == frozenset()
    assert cpu_list({7, 0, 1, 2, 5}) == "0-2,5,7"
    assert parse_cpus(cpu_list(range(0, 64, 3))) == set(range(0, 64, 3))
