"""Conversations: the roles, the rules, and one way to read them from any request or record.

Pure Python (no torch), so the feedback gateway validates conversations by the same rules
as the servers and the trainer that encode them (``rlhf.encoding``).

    Message(role, content)                 one turn; roles: system, user, assistant
    Prompt = str | Sequence[Message]       plain text or a conversation
    check_conversation(messages)           EncodingError naming the first bad message
    prompt_of(prompt, messages) -> Prompt  a request's or record's prompt (proto fields)
    prompt_text(prompt) -> str             a plain-text view (keys, logs)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


class EncodingError(ValueError):
    """A prompt or conversation that cannot be encoded; the message names what is wrong."""


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str


Prompt = str | Sequence[Message]


def check_conversation(messages: Sequence[Message]) -> None:
    """EncodingError naming the first bad message: unknown role, empty content, no messages."""
    if not messages:
        raise EncodingError("messages must hold at least one message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise EncodingError(
                f"messages[{i}].role: unknown role {m.role!r}; use one of {', '.join(ROLES)}"
            )
        if not m.content.strip():
            raise EncodingError(f"messages[{i}].content must not be empty")


def prompt_of(prompt: str, messages: Sequence[Any]) -> Prompt:
    """The prompt of a request or record with `prompt` and `messages` (role, content) fields:
    its conversation when it has messages, else its text."""
    if messages:
        return tuple(Message(m.role, m.content) for m in messages)
    return prompt


def prompt_text(prompt: Prompt) -> str:
    """A plain-text view of a prompt (keys, logs): the text, or `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.role}: {m.content}" for m in prompt)
