"""What a request's prompt becomes on the version that serves it.

Every policy version is served with the encoding it was trained with (``rlhf.encoding``,
read from its manifest when it is loaded): a ``prompt`` or a ``messages`` conversation is
rendered by that version's chat template (or taken as raw text when it has none), tokenised,
and truncated exactly as the trainer does, so what the server generates from is what
training later encodes for the same record.

    request_prompt(request) -> Prompt         the request's text or conversation, validated
    ServedPolicy.load(engine, path, version)  an engine's loaded version + its EncodingSpec
    render(served, prompt) -> Rendered        rendered text, token ids (truncated), full length

Errors are ``encoding.EncodingError`` with a message naming the field or the version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf import encoding
from rlhf.encoding import EncodingError, EncodingSpec, Message, Prompt
from rlhf.v1 import inference_pb2


def request_prompt(request: inference_pb2.GenerateRequest) -> Prompt:
    """The prompt text, or the conversation of ``messages``; exactly one must be given."""
    if request.prompt and request.messages:
        raise EncodingError("set either prompt or messages, not both")
    if request.messages:
        conversation = tuple(Message(m.role, m.content) for m in request.messages)
        encoding.check_conversation(conversation)
        return conversation
    if not request.prompt:
        raise EncodingError("prompt must not be empty (or send messages)")
    return request.prompt


@dataclass(frozen=True, eq=False)
class ServedPolicy:
    """A version loaded in the engine, with the encoding it is served with."""

    policy: Any  # the engine's Policy (services.policy.engine)
    encoding: EncodingSpec

    @classmethod
    def load(cls, engine: Any, path: Path, version: str) -> ServedPolicy:
        policy = engine.load(path, version)
        return cls(policy, encoding.spec_for_model(path, policy.tokenizer))

    @property
    def version(self) -> str:
        return str(self.policy.version)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.policy.tokenizer


@dataclass(frozen=True)
class Rendered:
    text: str  # what the tokenizer saw (the served-generation record keeps it)
    ids: list[int]  # truncated per the version's encoding: what the model continues
    tokens: int  # before truncation (what request limits bound)


def render(served: ServedPolicy, prompt: Prompt) -> Rendered:
    """Renders and tokenises ``prompt`` as ``served``'s training did (EncodingError if it
    cannot: a conversation for a version without a chat template)."""
    tok, spec = served.tokenizer, served.encoding
    try:
        text = encoding.render_prompt(tok, spec, prompt)
    except EncodingError as exc:
        raise EncodingError(f"model version {served.version}: {exc}") from None
    ids = encoding.tokenize_prompt(tok, spec, text)
    return Rendered(text, encoding.truncate_prompt(tok, spec, ids), len(ids))
