"""Per-sequence token selection and incremental detokenisation for the batching engine.

Every row of a decode batch may carry its own sampling parameters (TGI's: temperature,
top_p, top_k, repetition_penalty, greedy or sampled) and its own seeded ``torch.Generator``,
so one forward pass serves requests that asked for different things, and a seeded request
draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How one request's samples are drawn (validated by the server before they get here)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class RowState:
    """What token selection needs to know about one sequence of the batch."""

    params: SamplingParams
    generator: torch.Generator | None
    # Prompt and generated ids so far (repetition penalty looks at both, as in transformers).
    context: list[int]


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index`` of a seeded request: distinct per sample, fixed per (seed, index)."""
    return (seed * 1_000_003 + index * 7919 + 1) % (2**63 - 1)


def select_tokens(logits: Tensor, rows: Sequence[RowState]) -> tuple[list[int], list[float]]:
    """Chooses the next token of every row; returns (token ids, their logprobs).

    ``logits``: (B, V) float32 for the last position. The logprob reported is under the
    unprocessed distribution (temperature 1, no truncation), which is what training uses as
    the behaviour policy's log-probability (inference.proto, Token.logprob).
    """
    base_logprobs = torch.log_softmax(logits, dim=-1)
    scores = logits
    penalised = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if penalised:
        scores = scores.clone()
        for i in penalised:
            ids = torch.tensor(sorted(set(rows[i].context)), dtype=torch.long, device=scores.device)
            p = rows[i].params.repetition_penalty
            picked = scores[i, ids]
            scores[i, ids] = torch.where(picked > 0, picked / p, picked * p)

    sampled = [i for i, r in enumerate(rows) if r.params.do_sample]
    tokens = scores.argmax(dim=-1)
    if sampled:
        tokens = tokens.clone()
        idx = torch.tensor(sampled, dtype=torch.long, device=scores.device)
        sub = scores.index_select(0, idx)
        params = [rows[i].params for i in sampled]
        sub = sub / torch.tensor([p.temperature for p in params], device=sub.device)[:, None]
        sub = _top_k(sub, [p.top_k for p in params])
        sub = _top_p(sub, [p.top_p for p in params])
        cdf = torch.softmax(sub, dim=-1).cumsum(dim=-1)
        # Inverse-CDF sampling: one uniform draw from each row's own generator, then one
        # vectorised search (a multinomial call per row costs several times more).
        u = torch.cat(
            [torch.rand(1, generator=rows[i].generator, device=sub.device) for i in sampled]
        )
        # right=True: the first token whose cumulative mass exceeds the draw, so tokens that
        # top_k / top_p gave zero mass can never be picked.
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        tokens[idx] = picked.clamp(max=sub.shape[-1] - 1)
    chosen = base_logprobs.gather(1, tokens[:, None]).squeeze(1)
    return tokens.tolist(), chosen.tolist()


def _top_k(scores: Tensor, ks: list[int]) -> Tensor:
    if not any(k > 0 for k in ks):
        return scores
    vocab = scores.shape[-1]
    k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in ks], device=scores.device)
    top = torch.topk(scores, int(k.max()), dim=-1).values
    kth = top.gather(1, (k - 1)[:, None])
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p(scores: Tensor, ps: list[float]) -> Tensor:
    if not any(p < 1.0 for p in ps):
        return scores
    # Rows without nucleus sampling get an infinite threshold, so float error in the running
    # sum can never cut their tail.
    p = torch.tensor([x if x < 1.0 else float("inf") for x in ps], device=scores.device)
    sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
    probs = torch.softmax(sorted_scores, dim=-1)
    # Mass strictly before each token: the top token always survives.
    before = probs.cumsum(dim=-1) - probs
    sorted_scores = sorted_scores.masked_fill(before > p[:, None], float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, sorted_scores)


class Detokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    A byte-level token can end in the middle of a UTF-8 character; such a delta is held back
    (it would decode to U+FFFD) until the character completes, as TGI and vLLM do.
    """

    def __init__(self, tokenizer, prefix_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        # ``prefix_ids`` (the prompt's last tokens) only give the first deltas their context:
        # some tokenizers decode a token differently at the start of a text.
        self._ids: list[int] = list(prefix_ids)
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text of the ids held back so far (ending in U+FFFD: an unfinished character)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]
