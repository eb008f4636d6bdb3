"""The policy server's OpenAI-compatible HTTP API, driven by the real ``openai`` SDK (sync and
async) on localhost, with every served generation checked in a real Kafka broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry

from rlhf import bus, topics
from rlhf.models import build_tiny
from rlhf.v1 import events_pb2
from services.policy.server import PolicyServer
from tests.test_policy_server import VERSION, make_config

KEY = "infer-key-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, kafka) -> Iterator[PolicyServer]:
    model = build_tiny(tmp_path_factory.mktemp("openai") / "tiny", seed=0)
    srv = PolicyServer(make_config(model, kafka.bootstrap_servers), CollectorRegistry())
    srv.start_in_thread()
    yield srv
    srv.stop_in_thread()


@pytest.fixture(scope="module")
def base_url(server: PolicyServer) -> str:
    return f"http://127.0.0.1:{server.runtime.http_port}/v1"


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0) as c:
        yield c


def served(
    bootstrap: str, *until: str, timeout_s: float = 60
) -> dict[str, events_pb2.ServedGeneration]:
    """Every served generation in Kafka by request id, read until all of ``until`` showed up."""
    consumer = bus.Consumer(
        bootstrap, [topics.PROMPTS], group_id=f"test-{uuid.uuid4().hex}", client_id="test-http"
    )
    found: dict[str, events_pb2.ServedGeneration] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not found.keys() >= set(until):
            assert time.monotonic() < deadline, f"requests {set(until) - found.keys()} not in Kafka"
            for record in consumer.poll(timeout_s=1.0):
                found[record.value.request_id] = record.value
    finally:
        consumer.close()
    return found


def test_completions_n_seed_logprobs_and_the_kafka_record(client: openai.OpenAI, kafka) -> None:
    rid = uuid.uuid4().hex
    raw = client.completions.with_raw_response.create(
        model="policy",
        prompt="Hello",
        n=3,
        max_tokens=8,
        seed=11,
        temperature=0.9,
        logprobs=0,
        user="user-9",
        extra_headers={"x-request-id": rid},
    )
    reply = raw.parse()
    assert reply.model == VERSION and reply.object == "text_completion"
    assert reply.id == f"cmpl-{rid}"
    ids = [c.model_extra["generation_id"] for c in reply.choices]
    assert len(set(ids)) == 3
    assert raw.headers["x-rlhf-model-version"] == VERSION
    assert raw.headers["x-rlhf-generation-ids"] == ",".join(ids)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 6  # BOS + 5 bytes
    for choice in reply.choices:
        assert choice.finish_reason in ("length", "stop")
        assert choice.logprobs is not None and choice.logprobs.token_logprobs
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
        assert "".join(choice.logprobs.tokens or []) == choice.text
    assert reply.usage.completion_tokens == sum(
        len(c.logprobs.tokens or []) for c in reply.choices if c.logprobs
    )
    # The same seed reproduces the samples; another seed does not.
    again = client.completions.create(
        model="policy", prompt="Hello", n=3, max_tokens=8, seed=11, temperature=0.9
    )
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]
    other = client.completions.create(
        model="policy", prompt="Hello", n=3, max_tokens=8, seed=12, temperature=0.9
    )
    assert [c.text for c in other.choices] != [c.text for c in reply.choices]
    # The same Kafka record as a gRPC call: ids, texts, version, user.
    event = served(kafka.bootstrap_servers, rid)[rid]
    assert event.model_version == VERSION and event.user_id == "user-9" and event.prompt == "Hello"
    assert [s.generation_id for s in event.samples] == ids
    assert [s.text for s in event.samples] == [c.text for c in reply.choices]
    assert event.parameters.seed == 11 and event.parameters.do_sample


def test_model_selects_a_version_and_unknown_models_are_not_found(client: openai.OpenAI) -> None:
    listed = [m.id for m in client.models.list()]
    assert listed == ["policy", VERSION]
    pinned = client.completions.create(model=VERSION, prompt="Hi", max_tokens=2)
    assert pinned.model == VERSION
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert err.value.code == "model_not_found" and "policy" in err.value.message


def test_stop_sequence_is_cut_from_the_text_also_when_streamed(client: openai.OpenAI) -> None:
    greedy = client.completions.create(model="policy", prompt="Hello", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    assert len(text) >= 4
    stop = text[2:4]
    expected = text[: text.index(stop)]
    cut = client.completions.create(
        model="policy", prompt="Hello", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="policy", prompt="Hello", max_tokens=12, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streaming_sync_with_usage_matches_the_final_text(client: openai.OpenAI, kafka) -> None:
    rid = uuid.uuid4().hex
    stream = client.completions.create(
        model="policy",
        prompt="Once",
        n=2,
        max_tokens=16,
        seed=5,
        temperature=1.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": rid},
    )
    texts = ["", ""]
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        assert chunk.model == VERSION and chunk.id == f"cmpl-{rid}"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert set(finish) == {0, 1}
    unary = client.completions.create(
        model="policy", prompt="Once", n=2, max_tokens=16, seed=5, temperature=1.0
    )
    assert texts == [c.text for c in unary.choices]
    event = served(kafka.bootstrap_servers, rid)[rid]
    assert [s.text for s in event.samples] == texts
    assert usage is not None and usage.completion_tokens == sum(
        len(s.token_ids) for s in event.samples
    )


def test_errors_are_openai_errors(base_url: str, client: openai.OpenAI) -> None:
    bad = openai.OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError) as auth:
        bad.completions.create(model="policy", prompt="Hi")
    assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="policy", prompt="Hi", temperature=3.5)
    assert err.value.param == "temperature" and "temperature" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="policy", prompt="Hi", n=50)
    assert "n must be in 1..9" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="policy", prompt="Hi", frequency_penalty=1.0)
    assert "not supported" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="policy", prompt="Hi", extra_body={"colour": "red"})
    assert err.value.body == {
        "message": "Unrecognized request argument supplied: colour",
        "type": "invalid_request_error",
        "param": "colour",
        "code": None,
    }


async def _stream_one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str, str]:
    rid = f"c32-{uuid.uuid4().hex}"
    stream = await client.completions.create(
        model="policy",
        prompt=f"Client {i} says",
        max_tokens=24,
        seed=i,
        temperature=1.0,
        stream=True,
        extra_headers={"x-request-id": rid},
    )
    text, finish = "", ""
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return rid, text, finish


def test_32_concurrent_async_streams_all_complete(base_url: str, kafka) -> None:
    async def run() -> list[tuple[str, str, str]]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0) as c:
            unary = await c.completions.create(model="policy", prompt="async", max_tokens=4)
            assert unary.model == VERSION
            with pytest.raises(openai.BadRequestError):
                await c.completions.create(model="policy", prompt="", max_tokens=4)
            return await asyncio.gather(*(_stream_one(c, i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    assert all(finish in ("length", "stop") for _, _, finish in results)
    records = served(kafka.bootstrap_servers, *(rid for rid, _, _ in results))
    for rid, text, _ in results:
        assert records[rid].samples[0].text == text


def test_a_client_that_disconnects_cancels_its_generation(
    server: PolicyServer, base_url: str
) -> None:
    engine = server.engine
    assert engine is not None

    def metric(name: str, **labels: str) -> float:
        return server.registry.get_sample_value(f"rlhf_policy_{name}", labels) or 0.0

    before = metric("requests_aborted_total", reason="cancelled")

    async def leave_early() -> None:
        body = {"model": "policy", "prompt": "long", "max_tokens": 1500, "stream": True}
        headers = {"authorization": f"Bearer {KEY}"}
        url = f"{base_url}/completions"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=body, headers=headers) as resp,
        ):
            assert resp.status == 200
            await resp.content.readline()  # the first event arrived: generation is running

    asyncio.run(leave_early())
    assert engine.wait_idle(10)
    assert metric("requests_aborted_total", reason="cancelled") == before + 1
    assert metric("generated_tokens_total") < 10_000


def test_http_calls_are_counted_by_protocol(server: PolicyServer, client: openai.OpenAI) -> None:
    client.completions.create(model="policy", prompt="count me", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="policy", prompt="count me", max_tokens=0)
    registry = server.registry
    value = registry.get_sample_value(
        "rlhf_policy_requests_total",
        {"protocol": "http", "method": "/v1/completions", "code": "OK"},
    )
    assert value is not None and value >= 1
    bad = registry.get_sample_value(
        "rlhf_policy_requests_total",
        {"protocol": "http", "method": "/v1/completions", "code": "INVALID_ARGUMENT"},
    )
    assert bad is not None and bad >= 1
