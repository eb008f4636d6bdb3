"""Validation rules for feedback submissions, one precise message per rule.

Every rule raises ``Rejection`` with the gRPC status the client gets, a short ``reason``
(the label of ``rlhf_feedback_events_rejected_total``) and a message that names the field and
says what to change. The rules run on the request exactly as the client sent it, before PII
redaction, so the message refers to what the client can see.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from rlhf.chat import ROLES
from rlhf.runtime import CallError
from rlhf.v1 import events_pb2, feedback_pb2, inference_pb2
from services.feedback.config import LimitsConfig

MIN_RESPONSES = 2
# The paper's overall quality score runs 1..7 (a Likert scale); 0 means not given.
MAX_QUALITY = 7
FLAGS = frozenset(events_pb2.ResponseFlag.values()) - {events_pb2.RESPONSE_FLAG_UNSPECIFIED}


class Rejection(CallError):
    """A submission that is not stored, with the status and reason the client gets."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(code, message)
        self.reason = reason


def _invalid(reason: str, message: str) -> Rejection:
    return Rejection(grpc.StatusCode.INVALID_ARGUMENT, reason, message)


def _check_id(name: str, value: str, limits: LimitsConfig) -> None:
    if not value.strip():
        raise _invalid("missing_field", f"{name}: required, got an empty value")
    if len(value) > limits.max_id_chars:
        raise _invalid(
            "too_long", f"{name}: {len(value)} characters, over the limit of {limits.max_id_chars}"
        )


def check_text(name: str, value: str, limit: int) -> None:
    if not value.strip():
        raise _invalid("empty_text", f"{name}: must not be empty or only whitespace")
    if len(value) > limit:
        raise _invalid("too_long", f"{name}: {len(value)} characters, over the limit of {limit}")


def check_ranks(ranks: Sequence[int], k: int) -> None:
    """Ranks are one per response, dense 1..m (ties allowed), and not all tied.

    Every rank is checked against K before anything is built from the values, so the work
    done is bounded by K, never by a number inside the request."""
    if len(ranks) != k:
        raise _invalid(
            "ranks",
            f"ranks: {len(ranks)} ranks for {k} responses; give exactly one rank per response",
        )
    for i, rank in enumerate(ranks):
        if not 1 <= rank <= k:
            raise _invalid(
                "ranks",
                f"ranks[{i}]: rank {rank}; ranks run from 1 (best) to at most {k}, the number "
                "of responses",
            )
    used = set(ranks)
    top = max(ranks)
    missing = sorted(set(range(1, top + 1)) - used)
    if missing:
        raise _invalid(
            "ranks",
            f"ranks: {list(ranks)} skips rank {missing[0]}; ranks must use every value "
            f"1..{top} (ties share a rank)",
        )
    if top == 1:
        raise _invalid(
            "ranks", "ranks: every response is tied at rank 1; a ranking needs two different ranks"
        )


def check_distinct(texts: Sequence[str | None]) -> None:
    """No response may appear twice: the same text would be compared with itself.

    ``texts[i]`` is the text of responses[i], None where it is not known yet.
    """
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        if text is None:
            continue
        if text in first:
            raise _invalid(
                "duplicate_response",
                f"responses[{i}]: same text as responses[{first[text]}]; each response must be distinct",
            )
        first[text] = i


def check_judgements(i: int, ref: feedback_pb2.ResponseRef) -> None:
    """A response's quality score is 0 (not given) or 1..7; its flags are known, each once.

    At most one pass over the flags, stopping at the first repeat, so the work is bounded by
    the number of known flags whatever the request holds."""
    if ref.quality > MAX_QUALITY:
        raise _invalid(
            "quality",
            f"responses[{i}].quality: {ref.quality}; the quality score runs 1..{MAX_QUALITY} "
            "(0 or unset: not given)",
        )
    seen: set[int] = set()
    for j, flag in enumerate(ref.flags):
        if flag not in FLAGS:
            raise _invalid(
                "flags",
                f"responses[{i}].flags[{j}]: {flag} is not a known flag; known: "
                f"{', '.join(events_pb2.ResponseFlag.Name(f) for f in sorted(FLAGS))}",
            )
        if flag in seen:
            raise _invalid(
                "flags",
                f"responses[{i}].flags[{j}]: {events_pb2.ResponseFlag.Name(flag)} is given "
                "twice; mark each flag at most once",
            )
        seen.add(flag)


def check_prompt(
    prompt: str, messages: Sequence[inference_pb2.ChatMessage], limits: LimitsConfig
) -> None:
    """A prompt or a conversation (``messages``), not both. A conversation follows the rules
    the servers and the trainer encode it by (``rlhf.chat``): known roles, no empty turn;
    its turns together are bounded like a prompt."""
    if not messages:
        check_text("prompt", prompt, limits.max_prompt_chars)
        return
    if prompt:
        raise _invalid("prompt_and_messages", "prompt, messages: set one of them, not both")
    total = 0
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise _invalid(
                "bad_role",
                f"messages[{i}].role: unknown role {message.role[:32]!r}; use one of "
                f"{', '.join(ROLES)}",
            )
        check_text(f"messages[{i}].content", message.content, limits.max_prompt_chars)
        total += len(message.content)
        if total > limits.max_prompt_chars:
            raise _invalid(
                "too_long",
                f"messages: over {limits.max_prompt_chars} characters in all, the prompt limit",
            )


def validate_comparison(request: feedback_pb2.ComparisonRequest, limits: LimitsConfig) -> None:
    """Checks everything that needs no lookup; generation ids are resolved afterwards."""
    check_prompt(request.prompt, request.messages, limits)
    k = len(request.responses)
    if not MIN_RESPONSES <= k <= limits.max_responses:
        raise _invalid(
            "k_range",
            f"responses: K={k}; a comparison ranks {MIN_RESPONSES}..{limits.max_responses} responses",
        )
    seen_ids: dict[str, int] = {}
    texts: list[str | None] = []
    for i, ref in enumerate(request.responses):
        source = ref.WhichOneof("source")
        if source is None:
            raise _invalid("missing_field", f"responses[{i}]: set either generation_id or text")
        if source == "generation_id":
            _check_id(f"responses[{i}].generation_id", ref.generation_id, limits)
            if ref.generation_id in seen_ids:
                raise _invalid(
                    "duplicate_response",
                    f"responses[{i}]: generation id {ref.generation_id!r} repeats "
                    f"responses[{seen_ids[ref.generation_id]}]",
                )
            seen_ids[ref.generation_id] = i
            texts.append(None)
        else:
            check_text(f"responses[{i}].text", ref.text, limits.max_response_chars)
            texts.append(ref.text)
        check_judgements(i, ref)
    check_distinct(texts)
    check_ranks(list(request.ranks), k)
    _check_id("labeler_id", request.labeler_id, limits)
    _check_id("user_id", request.user_id, limits)
    _check_id("idempotency_key", request.idempotency_key, limits)


def validate_demonstration(
    request: feedback_pb2.DemonstrationRequest, limits: LimitsConfig
) -> None:
    check_prompt(request.prompt, request.messages, limits)
    check_text("response", request.response, limits.max_response_chars)
    _check_id("labeler_id", request.labeler_id, limits)
    _check_id("user_id", request.user_id, limits)
    _check_id("idempotency_key", request.idempotency_key, limits)
