"""Serving the BPE family like a real chat model: the chat API over real gRPC with Kafka,
GQA in the engine, multi-byte text across tokens, stop strings across tokens, PAD == EOS."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from rlhf import bus, encoding, topics
from rlhf.chat import Message
from rlhf.models import load_policy
from rlhf.pii import Redactor, redact_served
from rlhf.tokenizer import load_tokenizer
from rlhf.v1 import events_pb2, feedback_pb2, inference_pb2, inference_pb2_grpc
from services.feedback.config import LimitsConfig as FeedbackLimits
from services.feedback.validate import Rejection, validate_comparison, validate_demonstration
from services.policy.config import (
    LimitsConfig,
    ModelConfig,
    PolicyRuntimeConfig,
    PolicyServerConfig,
    PublishConfig,
)
from services.policy.engines.native import LoadedPolicy, NativeEngine
from services.policy.sampling import SamplingParams
from services.policy.server import PolicyServer

P = inference_pb2.GenerationParameters
M = inference_pb2.ChatMessage
CONVERSATION = [
    M(role="system", content="Réponds en une phrase."),
    M(role="user", content="Où est la gare ? 你好，世界"),
]


def _server(path: Path, version: str, bootstrap: str) -> PolicyServer:
    config = PolicyServerConfig(
        model=ModelConfig(path=str(path), version=version, device="cpu"),
        limits=LimitsConfig(max_input_tokens=256, max_new_tokens=64, default_max_new_tokens=8),
        publish=PublishConfig(bootstrap_servers=bootstrap, ack_timeout_s=5.0, max_backoff_s=1.0),
        runtime=PolicyRuntimeConfig(host="127.0.0.1", port=0, metrics_port=-1, http_port=-1),
    )
    server = PolicyServer(config, CollectorRegistry())
    server.start_in_thread()
    return server


@pytest.fixture(scope="module")
def servers(
    family_models: Callable[[str], Path], kafka
) -> Iterator[dict[str, inference_pb2_grpc.InferenceServiceStub]]:
    started = {
        family: _server(family_models(family) / "policy", f"{family}-chat-v1", kafka.bootstrap_servers)
        for family in ("bpe", "byte")
    }  # fmt: skip
    channels = {f: grpc.insecure_channel(f"127.0.0.1:{s.runtime.port}") for f, s in started.items()}
    yield {f: inference_pb2_grpc.InferenceServiceStub(c) for f, c in channels.items()}
    for family, server in started.items():
        channels[family].close()
        server.stop_in_thread()


def _read(
    bootstrap: str, request_ids: set[str], until: str
) -> dict[str, events_pb2.ServedGeneration]:
    """Served generations of ``request_ids`` on rlhf.prompts, read until ``until``'s arrived."""
    consumer = bus.Consumer(
        bootstrap, [topics.PROMPTS], group_id=f"test-{uuid.uuid4().hex}", client_id="test-chat"
    )
    found: dict[str, events_pb2.ServedGeneration] = {}
    deadline = time.monotonic() + 60
    try:
        while until not in found and time.monotonic() < deadline:
            for record in consumer.poll(timeout_s=1.0):
                if record.value.request_id in request_ids | {until}:
                    found[record.value.request_id] = record.value
    finally:
        consumer.close()
    assert until in found, "the served generation never reached Kafka"
    return found


def test_messages_are_rendered_with_the_versions_chat_template_and_recorded(
    servers, family_models: Callable[[str], Path], kafka
) -> None:
    stub = servers["bpe"]
    rid = uuid.uuid4().hex
    reply = stub.Generate(
        inference_pb2.GenerateRequest(
            messages=CONVERSATION, n=2, request_id=rid, parameters=P(max_new_tokens=8, seed=3, temperature=1.0)
        ),
        timeout=30,
    )  # fmt: skip
    tok = load_tokenizer(family_models("bpe") / "policy")
    as_dicts = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    rendered = tok.apply_chat_template(as_dicts, add_generation_prompt=True, tokenize=False)
    template_ids = tok.apply_chat_template(
        as_dicts, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert reply.model_version == "bpe-chat-v1"
    assert reply.prompt_tokens == len(template_ids)
    event = _read(kafka.bootstrap_servers, set(), until=rid)[rid]
    assert event.prompt == "" and list(event.messages) == CONVERSATION
    assert event.rendered_prompt == rendered and rendered.endswith("<|im_start|>assistant\n")
    assert [s.generation_id for s in event.samples] == [s.generation_id for s in reply.samples]
    # A plain prompt on a chat version is one user turn: the same ids, the same greedy reply.
    plain = stub.Generate(inference_pb2.GenerateRequest(prompt="Hi there"), timeout=30)
    turn = stub.Generate(
        inference_pb2.GenerateRequest(messages=[M(role="user", content="Hi there")]), timeout=30
    )
    assert plain.prompt_tokens == turn.prompt_tokens
    assert plain.samples[0].text == turn.samples[0].text


@pytest.mark.parametrize(
    ("family", "kwargs", "field"),
    [
        ("bpe", {"messages": [M(role="bot", content="hi")]}, "messages[0].role: unknown role 'bot'"),
        ("bpe", {"messages": [M(role="user", content="a"), M(role="user", content=" ")]},
         "messages[1].content must not be empty"),
        ("bpe", {}, "prompt must not be empty (or send messages)"),
        ("bpe", {"prompt": "hi", "messages": CONVERSATION}, "prompt or messages, not both"),
        ("byte", {"messages": CONVERSATION}, "byte-chat-v1: this model takes plain prompts"),
    ],
)  # fmt: skip
def test_bad_conversations_are_invalid_and_never_published(
    servers, kafka, family: str, kwargs: dict, field: str
) -> None:
    stub = servers[family]
    bad = uuid.uuid4().hex
    for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
        with pytest.raises(grpc.RpcError) as err:
            call(inference_pb2.GenerateRequest(request_id=bad, **kwargs), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
    good = uuid.uuid4().hex
    stub.Generate(
        inference_pb2.GenerateRequest(prompt="still serving", request_id=good), timeout=30
    )
    # One publisher, in order: the good request's record arrived, the bad one's never will.
    assert bad not in _read(kafka.bootstrap_servers, {bad}, until=good)


def test_multibyte_text_streams_exactly_as_it_finishes(servers) -> None:
    """BPE tokens split characters (data/chat.txt merges some, not others): streamed deltas,
    per-token texts and final texts agree, sample by sample."""
    request = inference_pb2.GenerateRequest(
        messages=CONVERSATION, n=4, return_logprobs=True, parameters=P(max_new_tokens=24, seed=11, temperature=1.5)
    )  # fmt: skip
    streamed: dict[int, str] = {}
    finished: dict[int, inference_pb2.Sample] = {}
    for event in servers["bpe"].GenerateStream(request, timeout=60):
        streamed[event.index] = streamed.get(event.index, "") + event.token.text
        if event.HasField("finished"):
            finished[event.index] = event.finished
    assert sorted(finished) == [0, 1, 2, 3]
    multibyte = 0
    for index, sample in finished.items():
        assert streamed[index] == sample.text
        assert "".join(t.text for t in sample.tokens) == sample.text
        multibyte += any(len(c.encode()) > 1 for c in sample.text)
    assert multibyte, "no sample produced a multi-byte character"


def test_a_stop_string_spanning_two_tokens_stops_there(servers) -> None:
    stub = servers["bpe"]
    params = P(max_new_tokens=32)
    free = stub.Generate(
        inference_pb2.GenerateRequest(messages=CONVERSATION, return_logprobs=True, parameters=params),
        timeout=30,
    ).samples[0]  # fmt: skip
    texts = [t.text for t in free.tokens]
    at = next(i for i in range(1, len(texts)) if texts[i - 1] and texts[i])
    stop = texts[at - 1][-1] + texts[at][0]  # the last char of one token, first of the next
    end = free.text.index(stop) + len(stop)
    params.stop.append(stop)
    reply = stub.Generate(
        inference_pb2.GenerateRequest(messages=CONVERSATION, parameters=params), timeout=30
    ).samples[0]
    assert reply.finish_reason == inference_pb2.FINISH_REASON_STOP_SEQUENCE
    assert reply.text == free.text[:end]


def _teacher_forced(policy: LoadedPolicy, prompt: list[int], tokens: tuple[int, ...]) -> tuple:
    full = torch.tensor([prompt + list(tokens)])
    with torch.inference_mode():
        logits = policy.model(input_ids=full).logits[0].float()
    steps = torch.arange(len(prompt) - 1, len(full[0]) - 1)
    logprobs = torch.log_softmax(logits[steps], dim=-1)
    return logits[steps].argmax(dim=-1).tolist(), logprobs[torch.arange(len(tokens)), list(tokens)]


def test_gqa_engine_matches_the_model_and_pad_equal_to_eos_changes_nothing(
    family_models: Callable[[str], Path],
) -> None:
    """Concurrent chat prompts of different lengths, batched by the engine on the Qwen2 GQA
    model: every greedy token is the model's own argmax, and a PAD == EOS tokenizer (the same
    weights) pads the batch without changing a token."""
    conversations = [
        [Message("user", "Hi")],
        [Message("system", "Be brief."), Message("user", "Tell me about rivers and the sea.")],
        [Message("user", "Grüße aus München! 你好")],
    ]
    params = SamplingParams(max_new_tokens=12)
    engine = NativeEngine(CollectorRegistry(), max_batch_size=8, max_step_tokens=256, device="cpu")
    outputs = {}
    try:
        for family in ("bpe", "bpe-pad-eos"):
            model, tok = load_policy(family_models(family) / "policy")
            assert model.config.num_key_value_heads < model.config.num_attention_heads
            policy = LoadedPolicy.of(model, tok, family)
            spec = encoding.EncodingSpec.for_tokenizer(tok)
            prompts = [encoding.prompt_ids(tok, spec, c) for c in conversations]

            async def run_all(policy=policy, prompts=prompts) -> list:
                gens = [engine.submit(policy, p, params) for p in prompts]
                return [(await g.result())[0] for g in gens]

            done = asyncio.run(run_all())
            for prompt, sample in zip(prompts, done, strict=True):
                greedy, logprobs = _teacher_forced(policy, prompt, sample.token_ids)
                assert list(sample.token_ids) == greedy[: len(sample.token_ids)]
                torch.testing.assert_close(
                    torch.tensor(sample.logprobs), logprobs, atol=2e-4, rtol=0
                )
            outputs[family] = [s.token_ids for s in done]
            assert (tok.pad_token_id == tok.eos_token_id) == family.endswith("pad-eos")
    finally:
        engine.stop()
    assert outputs["bpe"] == outputs["bpe-pad-eos"]


@pytest.mark.parametrize(
    ("prompt", "messages", "reason", "message"),
    [
        ("hi", CONVERSATION, "prompt_and_messages", "prompt, messages: set one of them, not both"),
        ("", [M(role="bot", content="x")], "bad_role", "messages[0].role: unknown role 'bot'"),
        ("", [M(role="user", content="")], "empty_text", "messages[0].content: must not be empty"),
        ("", [M(role="user", content="x" * 9), M(role="user", content="y" * 9)], "too_long",
         "messages: over 16 characters in all"),
        ("", [], "empty_text", "prompt: must not be empty"),
    ],
)  # fmt: skip
def test_the_feedback_gateway_checks_conversations_by_the_same_rules(
    prompt: str, messages: list, reason: str, message: str
) -> None:
    limits = FeedbackLimits(max_prompt_chars=16)
    refs = [feedback_pb2.ResponseRef(text="a"), feedback_pb2.ResponseRef(text="b")]
    requests = [
        lambda: validate_comparison(feedback_pb2.ComparisonRequest(
            prompt=prompt, messages=messages, responses=refs, ranks=[1, 2], labeler_id="l",
            user_id="u", idempotency_key="k"), limits),
        lambda: validate_demonstration(feedback_pb2.DemonstrationRequest(
            prompt=prompt, messages=messages, response="r", labeler_id="l", user_id="u",
            idempotency_key="k"), limits),
    ]  # fmt: skip
    for validate in requests:
        with pytest.raises(Rejection) as err:
            validate()
        assert err.value.reason == reason and message in err.value.message
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_served_conversations_are_redacted_before_kafka() -> None:
    event = events_pb2.ServedGeneration(
        messages=[M(role="user", content="Mail bob@example.com please")],
        rendered_prompt="<|im_start|>user\nMail bob@example.com please<|im_end|>\n",
        samples=[events_pb2.GeneratedSample(text="ok", token_ids=[1], logprobs=[-0.1])],
    )
    found = redact_served(Redactor(("email",)), event)
    assert found == {"email": 1}
    assert event.messages[0].content == "Mail [EMAIL] please"
    assert "bob@" not in event.rendered_prompt and "<|im_start|>user" in event.rendered_prompt
    assert list(event.samples[0].token_ids) == [1]  # an unchanged sample keeps its tokens
