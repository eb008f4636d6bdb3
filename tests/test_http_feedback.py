"""Feedback over plain HTTP/JSON, and bad input at every HTTP door: a ranking built from an
OpenAI-SDK response reaches Kafka exactly once, and malformed, mistyped, unknown, oversized or
unauthenticated requests get the right status and error body with nothing written to Kafka.
The README's HTTP examples run here as written, against the same running servers."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from prometheus_client import CollectorRegistry

from rlhf import topics
from rlhf.kafka_local import LocalKafka
from rlhf.models import InitConfig, init_models
from services.policy.server import PolicyServer
from services.reward.config import ModelConfig, RewardRuntimeConfig, RewardServerConfig
from services.reward.server import RewardServer
from tests.conftest import start_broker
from tests.test_feedback_gateway import Gateway, read_events, start_gateway
from tests.test_http_openai import KEY, served
from tests.test_policy_server import VERSION, make_config

FEEDBACK_KEY = "feedback-key-1"
ORIGIN = "https://label.example.com"
ROOT = Path(__file__).resolve().parents[1]
# The keys of the README's serving examples, accepted next to the tests' own.
README_KEYS = "my-infer-key infer; my-feedback-key feedback"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    kafka = start_broker(tmp_path_factory.mktemp("http-feedback-kafka"))
    yield kafka
    kafka.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # The chat family: the README's examples include chat.
    out = tmp_path_factory.mktemp("http-feedback") / "bpe"
    return init_models(InitConfig(out=str(out), tokenizer="bpe"))


@pytest.fixture(scope="module")
def policy(models: tuple[Path, Path], broker: LocalKafka) -> Iterator[str]:
    config = make_config(models[0], broker.bootstrap_servers)
    keys = f"{config.runtime.api_keys}; {README_KEYS}"
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, api_keys=keys))
    srv = PolicyServer(config, CollectorRegistry())
    srv.start_in_thread()
    yield f"http://127.0.0.1:{srv.runtime.http_port}"
    srv.stop_in_thread()


@pytest.fixture(scope="module")
def gateway(broker: LocalKafka) -> Iterator[Gateway]:
    keys = f"{FEEDBACK_KEY} feedback; {KEY} infer; {README_KEYS}"
    gw = start_gateway(broker.bootstrap_servers, api_keys=keys, cors=(ORIGIN,))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def feedback_url(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.runtime.http_port}/v1/feedback"


AUTH = {"authorization": f"Bearer {FEEDBACK_KEY}"}


def test_a_ranking_of_an_openai_response_lands_in_kafka_exactly_once(
    policy: str, feedback_url: str, broker: LocalKafka
) -> None:
    prompt = f"[{uuid.uuid4().hex[:6]}] Name a color."
    with openai.OpenAI(base_url=policy + "/v1", api_key=KEY, max_retries=0) as client:
        reply = client.completions.create(
            model="policy", prompt=prompt, n=3, max_tokens=8, seed=2, temperature=1.0, user="u-5"
        )
    ids = [choice.model_extra["generation_id"] for choice in reply.choices]
    key = f"rank-{uuid.uuid4().hex}"
    body = {
        "prompt": prompt,
        "responses": [{"generation_id": i} for i in ids],
        "ranks": [2, 1, 3],
        "labeler_id": "labeler-3",
        "user_id": "u-5",
        "idempotency_key": key,
    }
    first = httpx2.post(f"{feedback_url}/comparisons", json=body, headers=AUTH, timeout=30)
    assert first.status_code == 200, first.text
    ack = first.json()
    assert ack["duplicate"] is False and ack["event_id"]
    # A retry (the key in the standard header this time) is answered as a duplicate.
    retry = {k: v for k, v in body.items() if k != "idempotency_key"}
    again = httpx2.post(
        f"{feedback_url}/comparisons", json=retry, headers={**AUTH, "idempotency-key": key}
    )
    assert again.json() == {"event_id": ack["event_id"], "duplicate": True}
    stored = [
        r.value
        for r in read_events(broker.bootstrap_servers, [topics.COMPARISONS])
        if r.value.event_id == ack["event_id"]
    ]
    assert len(stored) == 1
    event = stored[0]
    assert [r.generation_id for r in event.responses] == ids
    assert [r.text for r in event.responses] == [c.text for c in reply.choices]
    assert [r.rank for r in event.responses] == [2, 1, 3]
    assert {r.model_version for r in event.responses} == {VERSION}
    assert all(len(r.token_ids) == len(r.logprobs) > 0 for r in event.responses)


def test_bulk_acks_each_item_and_cors_lets_a_web_page_post(
    feedback_url: str, broker: LocalKafka
) -> None:
    key = uuid.uuid4().hex
    demo = {"prompt": "Say hi.", "response": "Hi!", "labeler_id": "l", "user_id": "u", "idempotency_key": f"demo-{key}"}  # fmt: skip
    tied = {"prompt": "Pick.", "responses": [{"text": "A"}, {"text": "B"}], "ranks": [1, 1], "labeler_id": "l", "user_id": "u", "idempotency_key": f"tie-{key}"}  # fmt: skip
    reply = httpx2.post(
        f"{feedback_url}/bulk",
        json={"items": [{"demonstration": demo}, {"comparison": tied}]},
        headers={**AUTH, "origin": ORIGIN},
    )
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == ORIGIN
    bulk = reply.json()
    assert (bulk["accepted"], bulk["rejected"]) == (1, 1)
    assert bulk["items"][0]["code"] == 0 and not bulk["items"][0]["ack"]["duplicate"]
    assert bulk["items"][1]["code"] == 3 and "tied" in bulk["items"][1]["message"]
    preflight = httpx2.options(
        f"{feedback_url}/comparisons",
        headers={"origin": ORIGIN, "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 204
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    other = httpx2.options(
        f"{feedback_url}/comparisons",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


BIG = "x" * (300 * 1024)  # over the policy server's 256 KiB limit in make_config
HUGE = "x" * (4 * 1024 * 1024 + 1)  # over the gateway's default 4 MiB
OPENAI_OK = {"model": "policy", "prompt": "p", "max_tokens": 2}
COMPARISON_OK = {"prompt": "p", "responses": [{"text": "a"}, {"text": "b"}], "ranks": [1, 2], "labeler_id": "l", "user_id": "u"}  # fmt: skip
# (door, path, body, headers, status, what the error body must hold)
BAD: list[tuple[str, str, Any, dict[str, str], int, dict[str, Any]]] = [
    ("policy", "/v1/completions", b'{"model": "policy", "prompt": ', {}, 400, {"type": "invalid_request_error"}),
    ("policy", "/v1/completions", {**OPENAI_OK, "max_tokens": "2"}, {}, 400, {"param": "max_tokens"}),
    ("policy", "/v1/completions", {**OPENAI_OK, "colour": 1}, {}, 400, {"param": "colour"}),
    ("policy", "/v1/completions", [OPENAI_OK], {}, 400, {"type": "invalid_request_error"}),
    ("policy", "/v1/completions", {**OPENAI_OK, "prompt": BIG}, {}, 413, {"type": "invalid_request_error"}),
    ("policy", "/v1/completions", OPENAI_OK, {"authorization": ""}, 401, {"code": "invalid_api_key"}),
    ("policy", "/v1/completions", OPENAI_OK, {"authorization": "Bearer admin-key-1"}, 403, {"type": "permission_error"}),
    ("policy", "/generate", b"{inputs: 1}", {}, 400, {"error_type": "validation"}),
    ("policy", "/generate", {"inputs": "p", "parameters": {"max_new_tokens": "2"}}, {}, 422, {"error_type": "validation"}),
    ("policy", "/generate", {"inputs": 7}, {}, 422, {"error_type": "validation"}),
    ("policy", "/generate_stream", {"inputs": BIG}, {}, 413, {"error_type": "validation"}),
    ("policy", "/generate", {"inputs": "p"}, {"authorization": ""}, 401, {}),
    ("feedback", "/comparisons", b"\xff\xfe", AUTH, 400, {"status": "INVALID_ARGUMENT"}),
    ("feedback", "/comparisons", {**COMPARISON_OK, "ranks": "1,2"}, AUTH, 400, {"status": "INVALID_ARGUMENT"}),
    ("feedback", "/comparisons", {**COMPARISON_OK, "colour": "red"}, AUTH, 400, {"status": "INVALID_ARGUMENT"}),
    ("feedback", "/comparisons", {**COMPARISON_OK, "ranks": [1, 1]}, AUTH, 400, {"reason": "ranks"}),
    ("feedback", "/demonstrations", {"prompt": HUGE}, AUTH, 413, {"status": "RESOURCE_EXHAUSTED"}),
    ("feedback", "/comparisons", COMPARISON_OK, {"authorization": ""}, 401, {"status": "UNAUTHENTICATED"}),
    ("feedback", "/comparisons", COMPARISON_OK, {"authorization": f"Bearer {KEY}"}, 403, {"status": "PERMISSION_DENIED"}),
    ("feedback", "/bulk", {"items": [{"comparison": COMPARISON_OK}, {"comparison": 5}]}, AUTH, 400, {"status": "INVALID_ARGUMENT"}),
    ("feedback", "/nowhere", COMPARISON_OK, AUTH, 404, {"status": "NOT_FOUND"}),
]  # fmt: skip


def test_bad_input_gets_the_right_status_and_nothing_reaches_kafka(
    policy: str, feedback_url: str, broker: LocalKafka
) -> None:
    run = uuid.uuid4().hex[:8]
    bad_ids = []
    for i, (door, path, body, headers, status, expected) in enumerate(BAD):
        marker = f"bad-{run}-{i}"
        bad_ids.append(marker)
        if isinstance(body, dict) and door == "feedback" and "items" in body:
            body = {"items": [{"comparison": {**COMPARISON_OK, "idempotency_key": marker}}, *body["items"][1:]]}  # fmt: skip
        elif isinstance(body, dict) and door == "feedback":
            body = {**body, "idempotency_key": marker}
        send = {"authorization": f"Bearer {KEY}", "x-request-id": marker, **headers}
        send = {k: v for k, v in send.items() if v}
        url = (policy if door == "policy" else feedback_url) + path
        if isinstance(body, bytes):
            reply = httpx2.post(url, content=body, headers=send)
        else:
            reply = httpx2.post(url, json=body, headers=send)
        assert reply.status_code == status, (i, reply.text)
        error = reply.json()
        detail = error["error"] if isinstance(error["error"], dict) else error
        for name, value in expected.items():
            assert detail[name] == value, (i, error)
        message = detail["message"] if "message" in detail else detail["error"]
        assert isinstance(message, str) and len(message) > 10, (i, error)
    # A good request after the bad ones: once it is in Kafka, nothing of the bad ones is.
    good = f"good-{run}"
    ok = httpx2.post(policy + "/v1/completions", json=OPENAI_OK, headers={"authorization": f"Bearer {KEY}", "x-request-id": good})  # fmt: skip
    assert ok.status_code == 200
    assert not set(served(broker.bootstrap_servers, good)) & set(bad_ids)
    stored = read_events(broker.bootstrap_servers, [topics.COMPARISONS, topics.DEMONSTRATIONS])
    assert not {r.value.idempotency_key for r in stored} & set(bad_ids)


def readme_http_blocks() -> list[tuple[str, str]]:
    """(language, code) of every python and bash block in the README's HTTP section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## HTTP APIs", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S)


def test_the_readme_http_examples_work_as_written(
    policy: str, feedback_url: str, models: tuple[Path, Path], tmp_path: Path
) -> None:
    config = RewardServerConfig(
        model=ModelConfig(path=str(models[1]), device="cpu"),
        runtime=RewardRuntimeConfig(
            host="127.0.0.1", port=0, metrics_port=-1, http_host="127.0.0.1", http_port=0,
            api_keys=README_KEYS,
        ),
    )  # fmt: skip
    reward = RewardServer(config, CollectorRegistry())
    reward.start_in_thread()
    ports = {
        "localhost:8001": policy.removeprefix("http://"),
        "localhost:8002": f"127.0.0.1:{reward.runtime.http_port}",
        "localhost:8003": feedback_url.removeprefix("http://").removesuffix("/v1/feedback"),
    }
    blocks = readme_http_blocks()
    assert [language for language, _ in blocks] == ["python", "python", "bash"]
    outputs = []
    try:
        for i, (language, code) in enumerate(blocks):
            for written, running in ports.items():
                code = code.replace(written, running)
            script = tmp_path / f"block{i}.{'py' if language == 'python' else 'sh'}"
            script.write_text(code)
            command = [sys.executable] if language == "python" else ["bash", "-euo", "pipefail"]
            done = subprocess.run(
                [*command, str(script)],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            assert done.returncode == 0, f"README block {i}:\n{done.stdout}\n{done.stderr}"
            outputs.append(done.stdout)
    finally:
        reward.stop_in_thread()
    assert "'duplicate': False" in outputs[0] and VERSION in outputs[0]
    assert VERSION in outputs[1]
    assert outputs[2].count('"rewards"') == 2 and '"duplicate":false' in outputs[2]
