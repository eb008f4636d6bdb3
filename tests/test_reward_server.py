"""The reward server over real gRPC on localhost, on a tiny reward model saved to disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx2
import pytest
import torch
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from rlhf import checkpoint
from rlhf.chat import Message, Prompt
from rlhf.encoding import EncodingSpec
from rlhf.kafka_local import free_port
from rlhf.models import build_tiny, load_reward_model, reward_model_from_policy, score
from rlhf.v1 import inference_pb2, reward_pb2, reward_pb2_grpc
from services.reward.config import (
    BatchConfig,
    LimitsConfig,
    ModelConfig,
    RewardRuntimeConfig,
    RewardServerConfig,
)
from services.reward.server import RewardServer
from trainer import rm as rm_steps
from trainer.config import EncodingConfig

INFER = [("authorization", "Bearer rm-infer")]
M = inference_pb2.ChatMessage
BIAS = 0.25
SPEC = EncodingSpec()  # the default for a model directory without a manifest


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reward")
    rm, tok = reward_model_from_policy(build_tiny(root / "policy", seed=0))
    # A trained head would not be zero; a seeded random one makes rewards differ per text.
    with torch.no_grad():
        rm.head.weight.copy_(
            torch.randn(rm.head.weight.shape, generator=torch.Generator().manual_seed(0))
        )
        rm.bias.fill_(BIAS)
    return rm.save(root / "rm-v7", tok)


@pytest.fixture(scope="module")
def server(rm_dir: Path) -> Iterator[RewardServer]:
    config = RewardServerConfig(
        model=ModelConfig(path=str(rm_dir), device="cpu"),
        limits=LimitsConfig(max_responses=16, max_prompt_tokens=64, max_response_tokens=64),
        batch=BatchConfig(max_batch_pairs=32),
        runtime=RewardRuntimeConfig(
            host="127.0.0.1",
            port=0,
            metrics_host="127.0.0.1",
            metrics_port=0,
            http_host="127.0.0.1",
            http_port=0,
            api_keys="rm-infer infer; rm-feedback feedback",
            max_message_bytes=128 * 1024,
        ),
    )
    srv = RewardServer(config, CollectorRegistry())
    srv.start_in_thread()
    yield srv
    srv.stop_in_thread()


@pytest.fixture(scope="module")
def stub(server: RewardServer) -> Iterator[reward_pb2_grpc.RewardServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.runtime.port}") as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel)


def test_scores_match_training_encoding(stub, rm_dir: Path) -> None:
    responses = [
        "a helpful answer",
        "",
        "no",
        "a much longer answer than the others, with more words",
    ]
    reply = stub.Score(
        reward_pb2.ScoreRequest(prompt="question?", responses=responses), metadata=INFER, timeout=30
    )
    assert reply.model_version == "rm-v7"
    model, tok = load_reward_model(rm_dir)
    want = score(model, tok, SPEC, ["question?"] * len(responses), responses)
    torch.testing.assert_close(torch.tensor(list(reply.rewards)), want, atol=1e-5, rtol=1e-5)
    assert len(set(reply.rewards)) == len(responses)
    # The normalised reward is the raw score plus the saved bias.
    raw = score(model, tok, SPEC, ["question?"], responses[:1]) - model.bias
    assert reply.rewards[0] == pytest.approx(float(raw[0]) + BIAS, abs=1e-5)


def test_concurrent_requests_are_batched_and_correct(
    server: RewardServer, stub, rm_dir: Path
) -> None:
    model, tok = load_reward_model(rm_dir)
    requests = [
        reward_pb2.ScoreRequest(prompt=f"prompt {i}", responses=[f"r{i}", f"s{i}" * i])
        for i in range(12)
    ]
    futures = [stub.Score.future(r, metadata=INFER, timeout=30) for r in requests]
    for request, future in zip(requests, futures, strict=True):
        got = torch.tensor(list(future.result().rewards))
        want = score(model, tok, SPEC, [request.prompt] * 2, list(request.responses))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert server.scorer is not None
    assert server.scorer.metrics.scored._value.get() >= 24


def test_json_scoring_over_http_matches_grpc(server: RewardServer, stub) -> None:
    url = f"http://127.0.0.1:{server.runtime.http_port}"
    body = {"prompt": "question?", "responses": ["yes", "no"]}
    auth = {"authorization": "Bearer rm-infer"}
    reply = httpx2.post(f"{url}/v1/score", json=body, headers=auth)
    assert reply.status_code == 200
    grpc_reply = stub.Score(reward_pb2.ScoreRequest(**body), metadata=INFER, timeout=30)
    assert reply.json()["model_version"] == "rm-v7"
    assert reply.json()["rewards"] == pytest.approx(list(grpc_reply.rewards), rel=1e-6)
    assert httpx2.get(f"{url}/health").status_code == 200
    for sent, headers, status in [
        ({"prompt": "p", "responses": "no"}, auth, 400),
        ({"prompt": "p", "responses": ["x"], "temperature": 1}, auth, 400),
        ({"prompt": "", "responses": ["x"]}, auth, 400),
        ({"prompt": "p", "responses": ["x"] * 17}, auth, 400),
        ({"prompt": "p", "responses": ["x"], "model_version": "rm-v0"}, auth, 404),
        (body, {"authorization": "Bearer rm-feedback"}, 403),
        (body, {}, 401),
    ]:
        bad = httpx2.post(f"{url}/v1/score", json=sent, headers=headers)
        assert bad.status_code == status, bad.text
        assert bad.json()["error"]["code"] == status and bad.json()["error"]["message"]
    broken = httpx2.post(f"{url}/v1/score", content=b'{"prompt": "p",', headers=auth)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


@pytest.mark.parametrize(
    ("kwargs", "metadata", "code", "field"),
    [
        ({"prompt": "", "responses": ["x"]}, INFER, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            {"messages": [M(role="user", content="hi")], "responses": ["x"]},
            INFER,
            grpc.StatusCode.INVALID_ARGUMENT,
            "rm-v7: this model takes plain prompts",
        ),
        (
            {"prompt": "p", "messages": [M(role="user", content="hi")], "responses": ["x"]},
            INFER,
            grpc.StatusCode.INVALID_ARGUMENT,
            "not both",
        ),
        (
            {"messages": [M(role="robot", content="hi")], "responses": ["x"]},
            INFER,
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].role: unknown role 'robot'",
        ),
        ({"prompt": "p", "responses": []}, INFER, grpc.StatusCode.INVALID_ARGUMENT, "responses"),
        (
            {"prompt": "p", "responses": ["x"] * 17},
            INFER,
            grpc.StatusCode.INVALID_ARGUMENT,
            "responses",
        ),
        (
            {"prompt": "p" * 100, "responses": ["x"]},
            INFER,
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt",
        ),
        (
            {"prompt": "p", "responses": ["ok", "x" * 100]},
            INFER,
            grpc.StatusCode.INVALID_ARGUMENT,
            "responses[1]",
        ),
        (
            {"prompt": "p", "responses": ["x"], "model_version": "rm-v0"},
            INFER,
            grpc.StatusCode.NOT_FOUND,
            "model_version",
        ),
        (
            {"prompt": "p", "responses": ["x" * 200_000]},
            INFER,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        ),
        (
            {"prompt": "p", "responses": ["x"]},
            None,
            grpc.StatusCode.UNAUTHENTICATED,
            "missing API key",
        ),
        (
            {"prompt": "p", "responses": ["x"]},
            [("authorization", "Bearer nope")],
            grpc.StatusCode.UNAUTHENTICATED,
            "invalid",
        ),
        (
            {"prompt": "p", "responses": ["x"]},
            [("x-api-key", "rm-feedback")],
            grpc.StatusCode.PERMISSION_DENIED,
            "infer",
        ),
    ],
)
def test_bad_input(stub, kwargs, metadata, code, field) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(reward_pb2.ScoreRequest(**kwargs), metadata=metadata, timeout=30)
    assert err.value.code() == code
    assert field in err.value.details()
    ok = stub.Score(
        reward_pb2.ScoreRequest(prompt="p", responses=["x"]), metadata=INFER, timeout=30
    )
    assert len(ok.rewards) == 1


def test_health_and_metrics(server: RewardServer, stub) -> None:
    stub.Score(
        reward_pb2.ScoreRequest(prompt="p", responses=["x", "y"]), metadata=INFER, timeout=30
    )
    with grpc.insecure_channel(f"127.0.0.1:{server.runtime.port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="rlhf.v1.RewardService"), timeout=10
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    body = (
        urllib.request.urlopen(
            f"http://127.0.0.1:{server.runtime.metrics_port}/metrics", timeout=10
        )
        .read()
        .decode()
    )
    for line in [
        'rlhf_reward_requests_total{code="OK",method="rlhf.v1.RewardService/Score",protocol="grpc"}',
        'rlhf_reward_requests_total{code="INVALID_ARGUMENT",method="rlhf.v1.RewardService/Score",protocol="grpc"}',
        "rlhf_reward_batch_size_bucket",
        "rlhf_reward_scored_total",
        "rlhf_reward_value_bucket",
        'rlhf_reward_model_info{version="rm-v7"} 1.0',
    ]:
        assert line in body, line


def test_cli_serves_and_stops_on_sigterm(rm_dir: Path) -> None:
    port = free_port()
    env = dict(
        os.environ, RLHF_REWARD_MODEL__PATH=str(rm_dir), RLHF_REWARD_RUNTIME__HOST="127.0.0.1"
    )
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    argv = [
        "--runtime.port",
        str(port),
        "--runtime.metrics-port",
        "-1",
        "--runtime.http-port",
        "-1",
    ]
    argv += ["--model.device", "cpu"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "serve", "reward", *argv],
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
            check = health_pb2.HealthCheckRequest(service="rlhf.v1.RewardService")
            deadline = time.monotonic() + 90
            while health.Check(check, timeout=10).status != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "the reward server never became SERVING"
                time.sleep(0.2)
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            reply = stub.Score(reward_pb2.ScoreRequest(prompt="p", responses=["x"]), timeout=30)
            assert reply.model_version == "rm-v7"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "NO API KEYS CONFIGURED" in output and "reward server stopped" in output


# JSON bodies a conversation rule refuses, and what the refusal says ("chat" is a good
# conversation: refused only by a model without a chat template).
CONVERSATION_ERRORS = {
    "unknown_role": {"messages": [{"role": "robot", "content": "hi"}]},
    "empty_turn": {
        "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": " "}]
    },
    "empty_conversation": {"messages": []},
    "both": {"prompt": "p", "messages": [{"role": "user", "content": "hi"}]},
    "chat": {"messages": [{"role": "user", "content": "hi"}]},
}
CONVERSATION_ERRORS_SAY = {
    "unknown_role": "messages[0].role: unknown role 'robot'",
    "empty_turn": "messages[1].content must not be empty",
    "empty_conversation": "prompt must not be empty (or send messages)",
    "both": "set either prompt or messages, not both",
}


@pytest.mark.parametrize("family", ["byte", "bpe"])
def test_the_reward_server_scores_exactly_as_the_trainer_trains(
    family: str, family_models: Callable[[str], Path], tmp_path: Path
) -> None:
    """One example, two paths: the trainer's RM encoding (its config resolved against the
    model, then ``trainer.rm.encode_rankings``) and a reward server loading the checkpoint
    the trainer would publish (the spec read back from its manifest). Short limits make both
    truncate the prompt and a response; the BPE family renders its chat template."""
    rm, tok = load_reward_model(family_models(family) / "reward")
    with torch.no_grad():
        rm.head.weight.normal_(generator=torch.Generator().manual_seed(3))
        rm.bias.fill_(-0.5)
    spec = EncodingConfig(max_prompt_tokens=12, max_response_tokens=10).resolve(tok)
    assert spec.chat_template == (family == "bpe")
    with checkpoint.staging(tmp_path) as staged:
        rm.save(staged, tok)
        version = checkpoint.publish(
            tmp_path, "reward", staged, round_type="rm", encoding=spec.to_dict()
        ).version
    if family == "bpe":
        prompt: Prompt = (
            Message("system", "Réponds brièvement, s'il te plaît."),
            Message("user", "Où est la gare ? Elle est loin d'ici ?"),
        )
        request = reward_pb2.ScoreRequest(
            messages=[M(role=m.role, content=m.content) for m in prompt]
        )
    else:
        prompt = "a question long enough to be cut to its last tokens?"
        request = reward_pb2.ScoreRequest(prompt=prompt)
    responses = ["Oui.", "Non, c'est tout près, à côté du café, à deux minutes à pied."]
    request.responses.extend(responses)
    batch = rm_steps.encode_rankings(tok, spec, [prompt], [responses], [[1, 2]])
    assert int(batch.attention_mask[1].sum()) == 12 + 10  # both cut, EOS kept
    with torch.no_grad():
        trained = rm(batch.input_ids, batch.attention_mask)

    config = RewardServerConfig(
        model=ModelConfig(path=str(tmp_path / "reward" / version), device="cpu"),
        runtime=RewardRuntimeConfig(
            host="127.0.0.1", port=0, metrics_port=-1, http_host="127.0.0.1", http_port=0
        ),
    )
    server = RewardServer(config, CollectorRegistry())
    server.start_in_thread()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.runtime.port}") as channel:
            reply = reward_pb2_grpc.RewardServiceStub(channel).Score(request, timeout=30)
        # The HTTP/JSON door takes the same request, conversation included, and scores it the
        # same way; bad conversations are refused there by the same rules.
        url = f"http://127.0.0.1:{server.runtime.http_port}/v1/score"
        body = json_format.MessageToDict(request, preserving_proto_field_name=True)
        over_http = httpx2.post(url, json=body, timeout=30)
        refusals = {
            name: httpx2.post(url, json={**sent, "responses": responses}, timeout=30)
            for name, sent in CONVERSATION_ERRORS.items()
        }
    finally:
        server.stop_in_thread()
    assert reply.model_version == version
    torch.testing.assert_close(torch.tensor(list(reply.rewards)), trained, atol=1e-5, rtol=0)
    assert over_http.status_code == 200, over_http.text
    assert over_http.json()["model_version"] == version
    assert over_http.json()["rewards"] == pytest.approx(list(reply.rewards), abs=1e-6)
    for name, refused in refusals.items():
        if name == "chat" and family == "bpe":  # a model with a chat template takes it
            assert refused.status_code == 200, refused.text
            continue
        assert refused.status_code == 400, (name, refused.text)
        assert refused.json()["error"]["status"] == "INVALID_ARGUMENT"
        want = "this model takes plain prompts" if name == "chat" else CONVERSATION_ERRORS_SAY[name]
        assert want in refused.json()["error"]["message"], (name, refused.text)
