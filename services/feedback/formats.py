"""Parsers for the JSONL formats ``rlhf feedback import`` accepts. Each turns one JSON line
into one ``FeedbackItem`` that then goes through the same validation as a gRPC submission.

``feedback``       the JSON mapping of ``rlhf.v1.FeedbackItem`` (snake_case or camelCase):
                   ``{"comparison": {"prompt": ..., "responses": [{"text": ...},
                   {"generation_id": ...}], "ranks": [1, 2], "labeler_id": ..., "user_id": ...,
                   "idempotency_key": ...}}`` or ``{"demonstration": {...}}``.
``hh``             Preference pairs. Anthropic HH-RLHF: ``{"chosen": T1, "rejected": T2}`` where
                   both are ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` transcripts that share
                   everything up to the last assistant turn (that shared part is the prompt), or
                   with an explicit ``"prompt"`` and plain ``chosen``/``rejected`` responses.
                   Conversational (TRL's preference format, UltraFeedback-binarized):
                   ``chosen``/``rejected`` are lists of ``{"role", "content"}`` messages, the
                   same conversation up to a last assistant turn each (the prompt, a chat
                   conversation), optionally after an explicit ``"prompt"`` list of messages.
``ultrafeedback``  ``{"instruction" | "prompt": ..., "completions": [{"response": ...,
                   "overall_score" | "fine-grained_score" | "score" | "rating": ...}, ...]}``:
                   higher score ranks better, equal scores are ties; the prompt may be a list
                   of messages (a conversation).
``sft``            Demonstrations as chat transcripts (TRL's conversational formats):
                   ``{"messages": [..., {"role": "assistant", "content": ...}]}`` (the last turn
                   is the demonstration, the turns before it the conversation), or
                   ``{"prompt": str | [messages], "completion": str | [one assistant message]}``.

A conversation is checked by the gateway exactly as a gRPC submission's ``messages`` are
(roles ``system``/``user``/``assistant``, no empty turn, the prompt size limit); a parser
only checks the shape (each message an object with string ``role`` and ``content``).

Public datasets carry no labeler or user ids. A line may give ``labeler_id``/``user_id``;
otherwise the labeler is the importer's ``--labeler-id`` and the user id is derived from the
prompt, so one prompt never lands in two splits. A missing ``idempotency_key`` is derived
from the line's content, so importing the same file twice stores nothing new.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from rlhf.chat import Message, Prompt, prompt_text
from rlhf.v1 import feedback_pb2, inference_pb2

FORMATS = ("auto", "feedback", "hh", "ultrafeedback", "sft")

HH_ASSISTANT = "\n\nAssistant:"
_SCORE_KEYS = ("overall_score", "fine-grained_score", "score", "rating")
_RESPONSE_KEYS = ("response", "text", "completion")


class FormatError(ValueError):
    """A line that is not a record of the expected format."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def detect(record: Mapping[str, Any]) -> str:
    if "comparison" in record or "demonstration" in record:
        return "feedback"
    if "chosen" in record and "rejected" in record:
        return "hh"
    if "completions" in record:
        return "ultrafeedback"
    if "messages" in record or "completion" in record:
        return "sft"
    raise FormatError(
        f"unknown record with keys {sorted(record)[:6]}; expected comparison/demonstration, "
        "chosen/rejected, completions, messages or prompt/completion"
    )


def _string(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise FormatError(
            f"{key!r}: expected a string or a list of messages, got {type(value).__name__}"
        )
    return value


def _messages(value: Any, key: str) -> tuple[Message, ...]:
    """A JSON list of ``{"role", "content"}`` objects (both strings) as messages."""
    if not isinstance(value, list):
        raise FormatError(f"{key!r}: expected a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not (
            isinstance(m, Mapping)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise FormatError(
                f'{key}[{i}]: expected a message {{"role": string, "content": string}}'
            )
        out.append(Message(m["role"], m["content"]))
    return tuple(out)


def _last_turn(messages: tuple[Message, ...], key: str) -> tuple[tuple[Message, ...], str]:
    """(the turns before it, the text of) a conversation's last turn, the assistant's."""
    if not messages or messages[-1].role != "assistant":
        raise FormatError(f"{key!r}: the last message must be the assistant's (the response)")
    return messages[:-1], messages[-1].content


def _prompt_value(record: Mapping[str, Any], key: str) -> Prompt:
    """A prompt given as a string or as a list of messages."""
    value = record.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, key)
    raise FormatError(f"{key!r}: expected a string or a list of messages")


def _pair(record: Mapping[str, Any]) -> tuple[Prompt, str, str]:
    """(prompt, chosen, rejected) of a preference pair given as chat conversations."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise FormatError("'chosen' and 'rejected' must both be texts or both be conversations")
    before_a, text_a = _last_turn(_messages(chosen, "chosen"), "chosen")
    before_b, text_b = _last_turn(_messages(rejected, "rejected"), "rejected")
    if before_a != before_b:
        raise FormatError(
            "'chosen' and 'rejected' must be the same conversation up to their last turn"
        )
    explicit = record.get("prompt")
    if isinstance(explicit, list):
        conversation = (*_messages(explicit, "prompt"), *before_a)
    elif before_a:
        # UltraFeedback-binarized also keeps the first user turn as a string "prompt".
        conversation = before_a
    elif isinstance(explicit, str):
        return explicit, text_a.strip(), text_b.strip()
    else:
        raise FormatError("no prompt: give 'prompt' or the turns before the responses")
    return conversation, text_a.strip(), text_b.strip()


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Splits two HH transcripts into (prompt, chosen response, rejected response).

    The prompt is the shared transcript up to and including the last ``Assistant:`` marker
    that both contain; the responses are what follows it.
    """
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, common)
    if cut < 0 or cut + len(HH_ASSISTANT) > common:
        raise FormatError(
            "chosen and rejected do not share a transcript ending in '\\n\\nAssistant:'"
        )
    end = cut + len(HH_ASSISTANT)
    return chosen[:end].lstrip(), chosen[end:].strip(), rejected[end:].strip()


def _ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense ranks, 1 for the highest score; equal scores share a rank."""
    order = sorted(set(scores), reverse=True)
    rank_of = {score: i + 1 for i, score in enumerate(order)}
    return [rank_of[s] for s in scores]


def _score(completion: Mapping[str, Any], index: int) -> float:
    for key in _SCORE_KEYS:
        value = completion.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    raise FormatError(f"completions[{index}]: no numeric score (one of {list(_SCORE_KEYS)})")


def _response(completion: Mapping[str, Any], index: int) -> str:
    for key in _RESPONSE_KEYS:
        value = completion.get(key)
        if isinstance(value, str):
            return value
    raise FormatError(f"completions[{index}]: no response text (one of {list(_RESPONSE_KEYS)})")


def _ids(
    record: Mapping[str, Any], prompt: Prompt, labeler_id: str, line_key: str
) -> dict[str, Any]:
    """labeler_id, user_id and idempotency_key of a public-dataset line (given or derived)."""
    user_id = record.get("user_id")
    key = record.get("idempotency_key")
    return {
        "labeler_id": str(record.get("labeler_id") or labeler_id),
        "user_id": str(user_id) if user_id else f"prompt:{_digest(prompt_text(prompt))[:16]}",
        "idempotency_key": str(key) if key else f"import:{line_key}",
    }


def _prompt_fields(prompt: Prompt) -> dict[str, Any]:
    """The ``prompt`` or ``messages`` field of a request for ``prompt``."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {"messages": [inference_pb2.ChatMessage(role=m.role, content=m.content) for m in prompt]}


def _comparison(
    record: Mapping[str, Any],
    prompt: Prompt,
    texts: list[str],
    ranks: list[int],
    labeler_id: str,
    line_key: str,
) -> feedback_pb2.FeedbackItem:
    comparison = feedback_pb2.ComparisonRequest(
        responses=[feedback_pb2.ResponseRef(text=t) for t in texts],
        ranks=ranks,
        **_prompt_fields(prompt),
        **_ids(record, prompt, labeler_id, line_key),
    )
    return feedback_pb2.FeedbackItem(comparison=comparison)


def _demonstration(
    record: Mapping[str, Any], labeler_id: str, line_key: str
) -> feedback_pb2.FeedbackItem:
    prompt: Prompt
    if "messages" in record:
        prompt, response = _last_turn(_messages(record["messages"], "messages"), "messages")
        if not prompt:
            raise FormatError("'messages': no turn before the assistant's response")
    else:
        prompt = _prompt_value(record, "prompt")
        completion = record.get("completion")
        if isinstance(completion, list):
            turns = _messages(completion, "completion")
            if len(turns) != 1:
                raise FormatError("'completion': expected one assistant message")
            response = _last_turn(turns, "completion")[1]
        elif isinstance(completion, str):
            response = completion
        else:
            raise FormatError("'completion': expected a string or a list of messages")
    demonstration = feedback_pb2.DemonstrationRequest(
        response=response, **_prompt_fields(prompt), **_ids(record, prompt, labeler_id, line_key)
    )
    return feedback_pb2.FeedbackItem(demonstration=demonstration)


def parse_record(record: Any, fmt: str, labeler_id: str) -> feedback_pb2.FeedbackItem:
    """Turns one decoded JSON line into a FeedbackItem (raises FormatError)."""
    if not isinstance(record, Mapping):
        raise FormatError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect(record)
    line_key = _digest(json.dumps(record, sort_keys=True, ensure_ascii=False))[:32]
    if fmt == "feedback":
        item = feedback_pb2.FeedbackItem()
        try:
            json_format.ParseDict(dict(record), item)
        except json_format.ParseError as exc:
            raise FormatError(str(exc)) from None
        if item.WhichOneof("item") is None:
            raise FormatError("expected a 'comparison' or 'demonstration' object")
        return item
    if fmt == "hh":
        prompt: Prompt
        if isinstance(record.get("chosen"), list) or isinstance(record.get("rejected"), list):
            prompt, chosen, rejected = _pair(record)
        else:
            chosen, rejected = _string(record, "chosen"), _string(record, "rejected")
            if "prompt" in record:
                prompt = _prompt_value(record, "prompt")
                chosen, rejected = chosen.strip(), rejected.strip()
            else:
                prompt, chosen, rejected = split_hh(chosen, rejected)
        return _comparison(record, prompt, [chosen, rejected], [1, 2], labeler_id, line_key)
    if fmt == "sft":
        return _demonstration(record, labeler_id, line_key)
    if fmt == "ultrafeedback":
        prompt = _prompt_value(record, "instruction" if "instruction" in record else "prompt")
        completions = record.get("completions")
        if not isinstance(completions, list) or not all(
            isinstance(c, Mapping) for c in completions
        ):
            raise FormatError("'completions': expected a list of objects")
        texts = [_response(c, i) for i, c in enumerate(completions)]
        ranks = _ranks_from_scores([_score(c, i) for i, c in enumerate(completions)])
        return _comparison(record, prompt, texts, ranks, labeler_id, line_key)
    raise FormatError(f"unknown format {fmt!r}; one of {list(FORMATS)}")


def parse_line(line: str, fmt: str, labeler_id: str) -> feedback_pb2.FeedbackItem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FormatError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    return parse_record(record, fmt, labeler_id)
