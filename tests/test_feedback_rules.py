"""Pure parts of the feedback gateway: validation, PII redaction, splits, event ids, import
formats and the generation index. No broker needed."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import tracemalloc
from collections import Counter
from typing import Any

import grpc
import pytest

from rlhf.pii import Redactor
from rlhf.split import split_for_user
from rlhf.v1 import events_pb2, feedback_pb2
from services.feedback.config import LimitsConfig, PolicyConfig
from services.feedback.formats import FormatError, parse_line, parse_record, split_hh
from services.feedback.gateway import event_id_for, record_key
from services.feedback.generations import GenerationIndex
from services.feedback.validate import Rejection, validate_comparison, validate_demonstration

LIMITS = LimitsConfig(max_prompt_chars=100, max_response_chars=50, max_id_chars=20)


def comparison(**overrides: object) -> feedback_pb2.ComparisonRequest:
    fields: dict[str, object] = {
        "prompt": "Write a haiku about Kafka.",
        "responses": [
            feedback_pb2.ResponseRef(text="logs flow like rivers"),
            feedback_pb2.ResponseRef(generation_id="g1"),
            feedback_pb2.ResponseRef(text="brokers hum at night"),
        ],
        "ranks": [1, 2, 2],
        "labeler_id": "lab-1",
        "user_id": "user-1",
        "idempotency_key": "key-1",
    }
    fields.update(overrides)
    return feedback_pb2.ComparisonRequest(**fields)  # type: ignore[arg-type]


def texts(*values: str) -> list[feedback_pb2.ResponseRef]:
    return [feedback_pb2.ResponseRef(text=v) for v in values]


# --- validation -----------------------------------------------------------------------------


def test_valid_comparison_with_ties_and_generation_ids_passes() -> None:
    validate_comparison(comparison(), LIMITS)
    judged = [
        feedback_pb2.ResponseRef(text="a", quality=7, flags=[1, 2, 11]),
        feedback_pb2.ResponseRef(generation_id="g", quality=1),
    ]
    validate_comparison(comparison(responses=judged, ranks=[1, 2]), LIMITS)
    validate_comparison(comparison(responses=texts("a", "b"), ranks=[2, 1]), LIMITS)


@pytest.mark.parametrize(
    ("overrides", "reason", "message"),
    [
        ({"responses": texts("a"), "ranks": [1]}, "k_range", "K=1; a comparison ranks 2..9"),
        (
            {"responses": texts(*"abcdefghij"), "ranks": list(range(1, 11))},
            "k_range",
            "K=10",
        ),
        ({"ranks": [1, 2]}, "ranks", "2 ranks for 3 responses"),
        ({"ranks": [0, 1, 2]}, "ranks", "ranks[0]: rank 0; ranks run from 1 (best) to at most 3"),
        ({"ranks": [1, 2, 4]}, "ranks", "ranks[2]: rank 4; ranks run from 1 (best) to at most 3"),
        ({"ranks": [1, 3, 3]}, "ranks", "skips rank 2"),
        ({"ranks": [1, 1, 1]}, "ranks", "every response is tied"),
        (
            {"responses": texts("same", "same"), "ranks": [1, 2]},
            "duplicate_response",
            "same text as responses[0]",
        ),
        (
            {
                "responses": [
                    feedback_pb2.ResponseRef(generation_id="g1"),
                    feedback_pb2.ResponseRef(generation_id="g1"),
                ],
                "ranks": [1, 2],
            },
            "duplicate_response",
            "'g1' repeats responses[0]",
        ),
        (
            {"responses": texts("a", "  "), "ranks": [1, 2]},
            "empty_text",
            "responses[1].text: must not be empty",
        ),
        (
            {"responses": texts("a", "x" * 51), "ranks": [1, 2]},
            "too_long",
            "51 characters, over the limit of 50",
        ),
        ({"prompt": ""}, "empty_text", "prompt: must not be empty"),
        ({"prompt": "p" * 101}, "too_long", "prompt: 101 characters"),
        (
            {"responses": [feedback_pb2.ResponseRef(), *texts("a")], "ranks": [1, 2]},
            "missing_field",
            "responses[0]: set either generation_id or text",
        ),
        ({"labeler_id": ""}, "missing_field", "labeler_id: required"),
        ({"user_id": " "}, "missing_field", "user_id: required"),
        ({"idempotency_key": ""}, "missing_field", "idempotency_key: required"),
        ({"idempotency_key": "k" * 21}, "too_long", "idempotency_key: 21 characters"),
        (
            {
                "responses": [feedback_pb2.ResponseRef(text="a", quality=8), *texts("b")],
                "ranks": [1, 2],
            },
            "quality",
            "responses[0].quality: 8; the quality score runs 1..7",
        ),
        (
            {
                "responses": [*texts("a"), feedback_pb2.ResponseRef(text="b", flags=[2, 99])],
                "ranks": [1, 2],
            },
            "flags",
            "responses[1].flags[1]: 99 is not a known flag",
        ),
        (
            {
                "responses": [feedback_pb2.ResponseRef(generation_id="g", flags=[0]), *texts("b")],
                "ranks": [1, 2],
            },
            "flags",
            "responses[0].flags[0]: 0 is not a known flag",
        ),
        (
            {
                "responses": [
                    feedback_pb2.ResponseRef(text="a", flags=[2, 4, 2] * 1000),
                    *texts("b"),
                ],
                "ranks": [1, 2],
            },
            "flags",
            "responses[0].flags[2]: RESPONSE_FLAG_HALLUCINATION is given twice",
        ),
    ],
)
def test_invalid_comparison_says_why(
    overrides: dict[str, object], reason: str, message: str
) -> None:
    with pytest.raises(Rejection) as caught:
        validate_comparison(comparison(**overrides), LIMITS)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == reason
    assert message in caught.value.message


@pytest.mark.parametrize("huge", [2**31, 2**32 - 1, 1_000_000])
def test_work_on_ranks_is_bounded_by_k_not_by_a_rank(huge: int) -> None:
    """A rank like 2147483648 once made the gateway build a set of every number up to it."""
    request = comparison(responses=texts("a", "b"), ranks=[huge, 1])
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(Rejection, match=f"ranks\\[0\\]: rank {huge}; ranks run from 1"):
            validate_comparison(request, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak
    assert time.perf_counter() - started < 0.5


def test_demonstration_rules() -> None:
    ok = feedback_pb2.DemonstrationRequest(
        prompt="p", response="r", labeler_id="l", user_id="u", idempotency_key="k"
    )
    validate_demonstration(ok, LIMITS)
    bad = feedback_pb2.DemonstrationRequest()
    bad.CopyFrom(ok)
    bad.response = ""
    with pytest.raises(Rejection, match="response: must not be empty"):
        validate_demonstration(bad, LIMITS)


# --- PII ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "redacted", "counts"),
    [
        ("mail john.doe+rlhf@example.co.uk now", "mail [EMAIL] now", {"email": 1}),
        ("call 555-123-4567 or (555) 123-4567", "call [PHONE] or [PHONE]", {"phone": 2}),
        ("intl +44 20 7946 0958 and +14155552671", "intl [PHONE] and [PHONE]", {"phone": 2}),
        ("card 4111 1111 1111 1111, 4111-1111-1111-1111", "card [CARD], [CARD]", {"card": 2}),
        ("host 192.168.0.1 and 2001:db8::8a2e:370:7334", "host [IP] and [IP]", {"ip": 2}),
        ("loopback ::1 here", "loopback [IP] here", {"ip": 1}),
        ("a@b.io, 10.0.0.7", "[EMAIL], [IP]", {"email": 1, "ip": 1}),
    ],
)
def test_pii_is_redacted_and_counted(text: str, redacted: str, counts: dict[str, int]) -> None:
    assert Redactor().redact(text) == (redacted, Counter(counts))


@pytest.mark.parametrize(
    "text",
    [
        "In 2024 about 3,500 people came; version 1.2.3 at 12:30:45, ratio 3:2.",
        "order 12345678, zip 94103, years 1999-2004, C++ std::vector and a::b",
        "not a card: 1234 5678 9012 3456 (fails the Luhn check)",
    ],
)
def test_ordinary_numbers_are_left_alone(text: str) -> None:
    assert Redactor().redact(text) == (text, Counter())


def test_pii_kinds_are_configurable() -> None:
    text = "a@b.io from 10.0.0.7"
    assert Redactor(["ip"]).redact(text) == ("a@b.io from [IP]", Counter({"ip": 1}))
    with pytest.raises(ValueError, match="unknown PII kinds"):
        Redactor(["ssn"])
    with pytest.raises(ValueError, match="unknown PII kinds"):
        PolicyConfig(pii_kinds=("ssn",))


# --- splits and ids -------------------------------------------------------------------------


def test_split_is_a_stable_function_of_the_user_id() -> None:
    rng = random.Random(7)
    users = [f"user-{rng.getrandbits(64):x}" for _ in range(20_000)]
    splits = Counter(split_for_user(u, 0.1, 0.05) for u in users)
    assert abs(splits[events_pb2.SPLIT_VALIDATION] / len(users) - 0.10) < 0.01
    assert abs(splits[events_pb2.SPLIT_TEST] / len(users) - 0.05) < 0.01
    assert all(split_for_user(u, 0.1, 0.05) == split_for_user(u, 0.1, 0.05) for u in users[:100])
    assert {split_for_user(u, 0.0, 0.0) for u in users[:100]} == {events_pb2.SPLIT_TRAIN}


def test_event_ids_are_deterministic_per_kind_and_key() -> None:
    assert event_id_for("comparison", "k") == event_id_for("comparison", "k")
    assert event_id_for("comparison", "k") != event_id_for("demonstration", "k")
    assert event_id_for("comparison", "k") != event_id_for("comparison", "k2")
    assert len(event_id_for("comparison", "k")) == 32
    assert record_key("p") == record_key("p") != record_key("q")


# --- import formats -------------------------------------------------------------------------


def test_own_format_accepts_snake_and_camel_case() -> None:
    snake = {"comparison": {"prompt": "p", "responses": [{"text": "a"}, {"generation_id": "g"}],
             "ranks": [1, 2], "labeler_id": "l", "user_id": "u", "idempotency_key": "k"}}  # fmt: skip
    camel = {"comparison": {"prompt": "p", "responses": [{"text": "a"}, {"generationId": "g"}],
             "ranks": [1, 2], "labelerId": "l", "userId": "u", "idempotencyKey": "k"}}  # fmt: skip
    assert parse_line(json.dumps(snake), "auto", "x") == parse_line(
        json.dumps(camel), "feedback", "x"
    )
    demo = parse_line(json.dumps({"demonstration": {"prompt": "p", "response": "r"}}), "auto", "x")
    assert demo.demonstration.response == "r"


def test_hh_transcripts_split_at_the_last_shared_assistant_turn() -> None:
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant:"
    prompt, chosen, rejected = split_hh(shared + " Blue.", shared + " I won't.")
    assert prompt == shared.lstrip()
    assert (chosen, rejected) == ("Blue.", "I won't.")
    line = json.dumps({"chosen": shared + " Blue.", "rejected": shared + " I won't."})
    item = parse_line(line, "auto", "hh-import").comparison
    assert [r.text for r in item.responses] == ["Blue.", "I won't."]
    assert list(item.ranks) == [1, 2]
    assert item.labeler_id == "hh-import"
    assert item.user_id.startswith("prompt:")
    # The key comes from the content: importing the same line again dedupes.
    assert item.idempotency_key == parse_line(line, "hh", "other").comparison.idempotency_key
    explicit = parse_line(json.dumps({"prompt": "P", "chosen": " A ", "rejected": "B"}), "hh", "x")
    assert (explicit.comparison.prompt, explicit.comparison.responses[0].text) == ("P", "A")
    with pytest.raises(FormatError, match="do not share a transcript"):
        parse_line(json.dumps({"chosen": "Human: a", "rejected": "Human: b"}), "hh", "x")


def test_conversations_become_messages_in_every_format_that_takes_them() -> None:
    user, bot = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "A"}
    pair = {"chosen": [user, bot], "rejected": [user, {**bot, "content": "B"}]}
    item = parse_line(json.dumps(pair), "auto", "x").comparison
    assert [(m.role, m.content) for m in item.messages] == [("user", "Hi?")] and not item.prompt
    assert [r.text for r in item.responses] == ["A", "B"] and list(item.ranks) == [1, 2]
    # The user id is derived from the conversation: the same conversation, the same split.
    again = {"prompt": [user], "chosen": [bot], "rejected": [{**bot, "content": "B"}]}
    assert parse_line(json.dumps(again), "hh", "x").comparison.user_id == item.user_id
    demo = parse_line(json.dumps({"messages": [user, bot]}), "auto", "x").demonstration
    assert (list(demo.messages), demo.response) == (list(item.messages), "A")
    completion = {"prompt": "Plain?", "completion": [bot]}
    demo = parse_line(json.dumps(completion), "auto", "x").demonstration
    assert (demo.prompt, demo.response, list(demo.messages)) == ("Plain?", "A", [])


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "user", "content": "a"}]}, "last message must be the assistant's"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "no turn before"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\]: expected a message"),
        ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"}],
          "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "B"}]},
         "same conversation up to their last turn"),
        ({"chosen": "A", "rejected": [{"role": "assistant", "content": "B"}]},
         "both be texts or both be conversations"),
        ({"chosen": [{"role": "assistant", "content": "A"}],
          "rejected": [{"role": "assistant", "content": "B"}]}, "no prompt"),
        ({"prompt": "p", "completion": 3}, "'completion': expected a string or a list"),
    ],
)  # fmt: skip
def test_malformed_conversations_are_format_errors(record: dict[str, Any], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_record(record, "auto", "x")


def test_ultrafeedback_scores_become_dense_ranks_with_ties() -> None:
    record: dict[str, Any] = {
        "instruction": "Explain RLHF.",
        "completions": [
            {"response": "a", "overall_score": 6.5},
            {"response": "b", "overall_score": 9},
            {"response": "c", "fine-grained_score": 6.5},
            {"response": "d", "overall_score": 2},
        ],
        "user_id": "u-9",
    }
    item = parse_line(json.dumps(record), "auto", "x").comparison
    assert list(item.ranks) == [2, 1, 2, 3]
    assert item.user_id == "u-9"
    record["completions"][3] = {"response": "d"}
    with pytest.raises(FormatError, match=r"completions\[3\]: no numeric score"):
        parse_line(json.dumps(record), "auto", "x")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"foo": 1}', "unknown record"),
        ('{"comparison": {"ranks": "x"}}', "Failed to parse"),
        ('{"chosen": 1, "rejected": "a"}', "'chosen': expected a string"),
    ],
)
def test_bad_lines_raise_format_errors(line: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_line(line, "auto", "x")


# --- generation index -----------------------------------------------------------------------


def served(prompt: str, *ids: str, created_at_ms: int) -> events_pb2.ServedGeneration:
    return events_pb2.ServedGeneration(
        event_id="e",
        created_at_ms=created_at_ms,
        prompt=prompt,
        model_version="v7",
        samples=[
            events_pb2.GeneratedSample(
                generation_id=g, text=f"text {g}", token_ids=[1, 2], logprobs=[-0.5, -1.0]
            )
            for g in ids
        ],
    )


def test_index_resolves_waits_for_late_ids_and_expires_old_ones() -> None:
    now = [1_000_000.0]
    index = GenerationIndex(max_entries=3, ttl_s=60, clock=lambda: now[0])
    index.add(served("p", "a", "b", created_at_ms=int(now[0] * 1000)))

    async def scenario() -> None:
        found = await index.resolve({0: "a", 2: "b"}, wait_s=0)
        assert found[2].text == "text b" and found[0].model_version == "v7"
        assert found[0].token_ids == (1, 2) and found[0].logprobs == (-0.5, -1.0)

        # Published while the comparison waits: resolved as soon as it arrives.
        late = threading.Timer(0.2, index.add, [served("p", "c", created_at_ms=int(now[0] * 1000))])
        late.start()
        started = time.monotonic()
        assert (await index.resolve({1: "c"}, wait_s=5))[1].generation_id == "c"
        assert time.monotonic() - started < 2
        late.join()

        started = time.monotonic()
        with pytest.raises(Rejection) as caught:
            await index.resolve({1: "a", 3: "nope"}, wait_s=0.3)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert "responses[3].generation_id: 'nope' is unknown or expired" in caught.value.message
        assert time.monotonic() - started >= 0.3

        now[0] += 61  # past the TTL: known ids are expired, and not waited for
        started = time.monotonic()
        with pytest.raises(Rejection, match="'a' is unknown or expired"):
            await index.resolve({0: "a"}, wait_s=5)
        assert time.monotonic() - started < 1

    asyncio.run(scenario())


def test_index_is_bounded() -> None:
    index = GenerationIndex(max_entries=3, ttl_s=60)
    now_ms = int(time.time() * 1000)
    index.add(served("p", "a", "b", created_at_ms=now_ms))
    assert index.get("a") is not None  # a is now the most recently used
    index.add(served("p", "c", "d", created_at_ms=now_ms))
    assert len(index) == 3
    assert index.get("b") is None
    assert index.get("a") is not None and index.get("d") is not None
