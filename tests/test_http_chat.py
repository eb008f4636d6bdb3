"""Chat over HTTP on the BPE family (a real chat template): OpenAI's chat completions through
the ``openai`` SDK (sync and async, streamed and not) and ``huggingface_hub``'s
``chat_completion``, rendered by the serving version's template like a gRPC request with
``messages``; the Kafka record keeps the conversation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import openai
import pytest
from huggingface_hub import InferenceClient
from prometheus_client import CollectorRegistry

from rlhf.models import build_tiny
from services.policy.server import PolicyServer
from tests.test_http_openai import KEY, served
from tests.test_policy_server import VERSION, make_config

CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Name a color."},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, kafka) -> Iterator[PolicyServer]:
    model = build_tiny(tmp_path_factory.mktemp("chat") / "bpe", seed=0, tokenizer="bpe")
    srv = PolicyServer(make_config(model, kafka.bootstrap_servers), CollectorRegistry())
    srv.start_in_thread()
    yield srv
    srv.stop_in_thread()


@pytest.fixture(scope="module")
def url(server: PolicyServer) -> str:
    return f"http://127.0.0.1:{server.runtime.http_port}"


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def test_chat_completions_render_the_template_and_reach_kafka(client: openai.OpenAI, kafka) -> None:
    rid = uuid.uuid4().hex
    kwargs = dict(model="policy", messages=CHAT, n=2, max_tokens=12, seed=5, temperature=0.9)
    reply = client.chat.completions.create(
        **kwargs, user="u-7", logprobs=True, extra_headers={"x-request-id": rid}
    )
    assert reply.object == "chat.completion" and reply.model == VERSION
    assert reply.id == f"chatcmpl-{rid}"
    ids = [c.model_extra["generation_id"] for c in reply.choices]
    for choice in reply.choices:
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(t.logprob <= 0 for t in choice.logprobs.content)
    event = served(kafka.bootstrap_servers, rid)[rid]
    assert [(m.role, m.content) for m in event.messages] == [
        (m["role"], m["content"]) for m in CHAT
    ]
    assert "Name a color." in event.rendered_prompt and event.rendered_prompt != "Name a color."
    assert [s.generation_id for s in event.samples] == ids
    assert [s.text for s in event.samples] == [c.message.content for c in reply.choices]
    # Streamed with the same seed: the role first, then deltas that add up to the same texts.
    texts = ["", ""]
    finish: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            if choice.delta.role:
                assert choice.delta.role == "assistant"
            texts[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish.get(choice.index, "")
    assert texts == [c.message.content for c in reply.choices]
    assert set(finish.values()) <= {"stop", "length"}


def test_async_chat_stream(url: str) -> None:
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as c:
            kwargs = dict(model="policy", messages=CHAT, max_tokens=10, seed=9, temperature=1.0)
            unary = await c.chat.completions.create(**kwargs)
            streamed = ""
            async for chunk in await c.chat.completions.create(**kwargs, stream=True):
                streamed += "".join(ch.delta.content or "" for ch in chunk.choices)
            return unary.choices[0].message.content or "", streamed

    unary, streamed = asyncio.run(run())
    assert unary == streamed


def test_inference_client_chat_completion(url: str) -> None:
    hf = InferenceClient(base_url=url, api_key=KEY)
    kwargs = dict(model="policy", max_tokens=10, seed=3, temperature=1.0)
    out = hf.chat_completion(CHAT, **kwargs)
    assert out.model == VERSION and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens >= 1
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in hf.chat_completion(CHAT, stream=True, **kwargs)
        if chunk.choices
    )
    assert streamed == out.choices[0].message.content


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "tool", "content": "x"}], "role"),
        ([{"role": "user", "content": "   "}], "content"),
        ([], "messages"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text"),
        ([{"role": "user", "content": "hi", "name": "bob"}], "name"),
    ],
)
def test_bad_conversations_are_bad_requests(client: openai.OpenAI, messages, message) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="policy", messages=messages, max_tokens=4)
    assert message in err.value.message
