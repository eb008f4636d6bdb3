"""The one encoding of (prompt or conversation, response) for serving, scoring and training.

The policy server, the reward server and every trainer step and gate turn text into token ids
here and nowhere else, following an `EncodingSpec` that travels with the model: the trainer
writes the spec it trained with into each checkpoint's manifest (`encoding`), and a server
that loads the checkpoint reads it back (`spec_for_model`), so a version is served and scored
exactly as it was trained.

    EncodingSpec(chat_template, max_prompt_tokens, max_response_tokens, truncation_side,
                 append_eos)                     frozen; to_dict() / from_dict() for manifests
    render_prompt(tok, spec, prompt) -> str      the text the tokenizer sees before a response
    tokenize_prompt(tok, spec, text) / truncate_prompt(tok, spec, ids)   the next two steps
    truncate_response(spec, ids)                 cut untruncated response ids as training does
    prompt_ids(tok, spec, prompt) -> list[int]   rendered, tokenised, truncated
    response_ids(tok, spec, response) -> list[int]   tokenised, truncated, + EOS
    encode_pairs(tok, spec, prompts, responses) -> PairBatch
        THE function: right-padded prompt + response ids, attention mask, response mask.
    encode_prompts(tok, spec, prompts) -> (input_ids, attention_mask), left-padded for generation
    encode_texts(tok, texts, max_tokens)         plain text (pretraining examples), right-padded
    join_pairs(prompt_ids, response_ids, pad_id) -> PairBatch   already-tokenised pairs
    pad(seqs, pad_id, side) -> (input_ids, attention_mask)

A prompt is plain text or a conversation (a sequence of `Message(role, content)`, roles
system / user / assistant, ending where the assistant's reply starts; ``rlhf.chat``). With
`chat_template` on, a conversation is rendered by the tokenizer's chat template with the
assistant's generation prompt, and plain text is one user turn; the rendered text carries its
own special tokens (BOS), so it is tokenised without adding any. With it off, plain text is
tokenised as is with the tokenizer's own prefix (BOS), and a conversation is an error. The
prompt and the response are tokenised separately and joined, which is exactly what
generation does (the response's tokens follow the prompt's), so a response scored by the
reward model is split into tokens the way the policy would have produced it from text.

Truncation: a prompt over `max_prompt_tokens` keeps its leading special tokens (BOS, and the
template's opening ones) and its END with truncation_side "left" (the text nearest the
response matters most, and it holds the assistant's generation prompt), or its beginning with
"right". A response keeps its first tokens and, with `append_eos`, ends with EOS: a text
response is a finished one. Responses are cut to max_response_tokens (EOS included).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from rlhf.chat import EncodingError, Message, Prompt, check_conversation, prompt_text

__all__ = [
    "EncodingError",
    "EncodingSpec",
    "Message",
    "PairBatch",
    "Prompt",
    "check_conversation",
    "encode_pairs",
    "encode_prompts",
    "encode_texts",
    "has_chat_template",
    "join_pairs",
    "pad",
    "prompt_ids",
    "prompt_text",
    "render_prompt",
    "response_ids",
    "spec_for_model",
    "tokenize_prompt",
    "truncate_prompt",
    "truncate_response",
]

SIDES = ("left", "right")


@dataclasses.dataclass(frozen=True)
class EncodingSpec:
    """How a model's examples are turned into token ids; recorded in its manifest."""

    # Render prompts with the tokenizer's chat template (plain text is one user turn).
    chat_template: bool = False
    # Longest prompt in tokens after rendering; longer ones are truncated (truncation_side).
    max_prompt_tokens: int = 1024
    # Longest response in tokens, EOS included; longer ones keep their beginning.
    max_response_tokens: int = 1024
    # "left": a long prompt loses its beginning (keeps the end); "right": loses its end.
    truncation_side: str = "left"
    # Close every text response with the tokenizer's EOS (a finished response).
    append_eos: bool = True

    def __post_init__(self) -> None:
        if self.truncation_side not in SIDES:
            raise ValueError(f"truncation_side must be left or right, got {self.truncation_side!r}")
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 1 + int(self.append_eos):
            raise ValueError(
                "max_prompt_tokens must be >= 1 and max_response_tokens >= 2 with append_eos "
                f"(got {self.max_prompt_tokens}, {self.max_response_tokens})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncodingSpec:
        """Unknown keys are an error: a reader must never encode differently than written."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"encoding has unknown settings {unknown}; upgrade this reader")
        return cls(**dict(data))

    @classmethod
    def for_tokenizer(cls, tok: PreTrainedTokenizerBase, **overrides: Any) -> EncodingSpec:
        """The default for a model with no recorded spec: its chat template when it has one."""
        return cls(**{"chat_template": has_chat_template(tok), **overrides})


def has_chat_template(tok: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tok, "chat_template", None))


def spec_for_model(path: str | Path, tok: PreTrainedTokenizerBase) -> EncodingSpec:
    """The spec in a checkpoint's manifest; for a directory without one (an initial model,
    any Hugging Face model) the default for its tokenizer."""
    manifest = Path(path) / "manifest.json"
    if manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("encoding")
        if recorded is not None:
            return EncodingSpec.from_dict(recorded)
    return EncodingSpec.for_tokenizer(tok)


# --------------------------------------------------------------------------- prompts


def render_prompt(tok: PreTrainedTokenizerBase, spec: EncodingSpec, prompt: Prompt) -> str:
    """The text the tokenizer sees before the response (for a chat model: with its specials)."""
    if not spec.chat_template:
        if not isinstance(prompt, str):
            raise EncodingError(
                "this model takes plain prompts (its encoding has no chat template); "
                "send a prompt instead of messages"
            )
        return prompt
    if not has_chat_template(tok):
        raise EncodingError("the encoding asks for a chat template but the tokenizer has none")
    messages = [Message("user", prompt)] if isinstance(prompt, str) else list(prompt)
    check_conversation(messages)
    try:
        text = tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
    except Exception as exc:  # jinja2 raises for conversations a template refuses
        raise EncodingError(f"the chat template refused the conversation: {exc}") from exc
    return str(text)


def tokenize_prompt(tok: PreTrainedTokenizerBase, spec: EncodingSpec, text: str) -> list[int]:
    """A rendered prompt's ids: raw text gets the tokenizer's prefix (BOS); a rendered chat
    prompt carries its own special tokens."""
    return list(tok(text, add_special_tokens=not spec.chat_template)["input_ids"])


def truncate_prompt(
    tok: PreTrainedTokenizerBase, spec: EncodingSpec, ids: Sequence[int]
) -> list[int]:
    """Prompt ids cut to max_prompt_tokens on the spec's truncation side (module doc)."""
    ids = list(ids)
    if len(ids) <= spec.max_prompt_tokens:
        return ids
    if spec.truncation_side == "right":
        return ids[: spec.max_prompt_tokens]
    special = set(tok.all_special_ids)
    n_prefix = next((i for i, t in enumerate(ids) if t not in special), len(ids))
    n_prefix = min(n_prefix, spec.max_prompt_tokens - 1)
    return ids[:n_prefix] + ids[len(ids) - (spec.max_prompt_tokens - n_prefix) :]


def prompt_ids(
    tok: PreTrainedTokenizerBase, spec: EncodingSpec, prompt: Prompt, *, truncate: bool = True
) -> list[int]:
    """Rendered and tokenised prompt, truncated per the spec (raises EncodingError)."""
    ids = tokenize_prompt(tok, spec, render_prompt(tok, spec, prompt))
    return truncate_prompt(tok, spec, ids) if truncate else ids


def response_ids(
    tok: PreTrainedTokenizerBase, spec: EncodingSpec, response: str, *, truncate: bool = True
) -> list[int]:
    """Response tokens, cut to max_response_tokens including the closing EOS."""
    ids = list(tok(response, add_special_tokens=False)["input_ids"])
    if spec.append_eos:
        ids.append(tok.eos_token_id)
    return truncate_response(spec, ids) if truncate else ids


def truncate_response(spec: EncodingSpec, ids: Sequence[int]) -> list[int]:
    """Untruncated `response_ids` cut to max_response_tokens, keeping the closing EOS."""
    if len(ids) <= spec.max_response_tokens:
        return list(ids)
    if spec.append_eos:
        return [*ids[: spec.max_response_tokens - 1], ids[-1]]
    return list(ids[: spec.max_response_tokens])


# --------------------------------------------------------------------------- batches


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """Token lists -> (input_ids, attention_mask) as long tensors, padded on `side`."""
    if side not in SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True)
class PairBatch:
    """Right-padded prompt+response sequences. `response_mask` is 1 on response tokens
    (including the closing EOS), so token t's log-prob is read from logits at t-1."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor

    def to(self, device: str | torch.device) -> PairBatch:
        return PairBatch(*(t.to(device) for t in dataclasses.astuple(self)))


def join_pairs(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> PairBatch:
    """Already-tokenised (prompt, response) pairs -> right-padded PairBatch."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ids, mask = pad([[*p, *r] for p, r in zip(prompts, responses, strict=True)], pad_id)
    resp, _ = pad([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses, strict=True)], 0)
    return PairBatch(ids, mask, resp)


def encode_pairs(
    tok: PreTrainedTokenizerBase,
    spec: EncodingSpec,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
) -> PairBatch:
    """(prompt or conversation, response) examples -> PairBatch, as every component encodes them."""
    return join_pairs(
        [prompt_ids(tok, spec, p) for p in prompts],
        [response_ids(tok, spec, r) for r in responses],
        tok.pad_token_id,
    )


def encode_prompts(
    tok: PreTrainedTokenizerBase, spec: EncodingSpec, prompts: Sequence[Prompt]
) -> tuple[Tensor, Tensor]:
    """Prompts -> left-padded (input_ids, attention_mask) for `model.generate`."""
    return pad([prompt_ids(tok, spec, p) for p in prompts], tok.pad_token_id, "left")


def encode_texts(
    tok: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int = 256
) -> tuple[Tensor, Tensor]:
    """Plain texts (pretraining examples, never templated) -> right-padded (input_ids,
    attention_mask), each with the tokenizer's prefix and cut to its first `max_tokens`."""
    ids = [list(tok(t, add_special_tokens=True)["input_ids"])[:max_tokens] for t in texts]
    return pad(ids, tok.pad_token_id)
