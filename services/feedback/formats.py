"""Parsers for the JSONL formats ``rlhf feedback import`` accepts. Each turns one JSON line
into one ``FeedbackItem`` that then goes through the same validation as a gRPC submission.

``feedback``       the JSON mapping of ``rlhf.v1.FeedbackItem`` (snake_case or camelCase):
                   ``{"comparison": {"prompt": ..., "responses": [{"text": ...},
                   {"generation_id": ...}], "ranks": [1, 2], "labeler_id": ..., "user_id": ...,
                   "idempotency_key": ...}}`` or ``{"demonstration": {...}}``.
``hh``             Anthropic HH-RLHF pairs: ``{"chosen": T1, "rejected": T2}`` where both are
                   ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` transcripts that share everything
                   up to the last assistant turn (that shared part is the prompt), or with an
                   explicit ``"prompt"`` and plain ``chosen``/``rejected`` responses.
``ultrafeedback``  ``{"instruction" | "prompt": ..., "completions": [{"response": ...,
                   "overall_score" | "fine-grained_score" | "score" | "rating": ...}, ...]}``:
                   higher score ranks better, equal scores are ties.

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

from rlhf.v1 import feedback_pb2

FORMATS = ("auto", "feedback", "hh", "ultrafeedback")

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
    raise FormatError(
        f"unknown record with keys {sorted(record)[:6]}; expected comparison/demonstration, "
        "chosen/rejected or completions"
    )


def _string(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise FormatError(f"{key!r}: expected a string, got {type(value).__name__}")
    return value


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


def _comparison(
    record: Mapping[str, Any],
    prompt: str,
    texts: list[str],
    ranks: list[int],
    labeler_id: str,
    line_key: str,
) -> feedback_pb2.FeedbackItem:
    user_id = record.get("user_id")
    key = record.get("idempotency_key")
    comparison = feedback_pb2.ComparisonRequest(
        prompt=prompt,
        responses=[feedback_pb2.ResponseRef(text=t) for t in texts],
        ranks=ranks,
        labeler_id=str(record.get("labeler_id") or labeler_id),
        user_id=str(user_id) if user_id else f"prompt:{_digest(prompt)[:16]}",
        idempotency_key=str(key) if key else f"import:{line_key}",
    )
    return feedback_pb2.FeedbackItem(comparison=comparison)


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
        chosen, rejected = _string(record, "chosen"), _string(record, "rejected")
        if "prompt" in record:
            prompt = _string(record, "prompt")
            chosen, rejected = chosen.strip(), rejected.strip()
        else:
            prompt, chosen, rejected = split_hh(chosen, rejected)
        return _comparison(record, prompt, [chosen, rejected], [1, 2], labeler_id, line_key)
    if fmt == "ultrafeedback":
        prompt = record.get("instruction", record.get("prompt"))
        if not isinstance(prompt, str):
            raise FormatError("expected the prompt as a string under 'instruction' or 'prompt'")
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
