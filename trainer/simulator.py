"""Simulated labelers with a hidden preference: the ground truth that proves the loop learns.

A labeler prefers responses in which certain characters are frequent (``HiddenPreference``:
by default the rate of the letter "e" among the response's bytes). The property is measurable
from the text alone, so the test and the demo can check that the reward model recovers it
and that PPO-ptx raises it, and a 2-layer byte-level model can pick it up in seconds.

Labelers disagree like people do: with ``noise`` = 0.27 about 27% of a labeler's ordered
pairs go against the hidden preference (the paper's inter-labeler agreement is 72.6%). Noise
is a Gaussian perturbation of the scores, scaled per ranking so that the expected fraction
of flipped pairs equals ``noise``; a ranking stays a consistent order.

Labelers never hold a model: they take a ``SampleFn`` — "give me K responses to this
prompt" — which is either a local model (``local_sampler``, the trainer's learning test) or
the policy server over gRPC (the demo client). A ranking becomes a ``ComparisonEvent``
written straight to Kafka (``Ranking.to_event``) or a ``ComparisonRequest`` for the feedback
gateway (``Ranking.to_request``).
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf.encoding import EncodingSpec
from rlhf.split import split_for_user
from rlhf.v1 import events_pb2, feedback_pb2

_NAMESPACE = uuid.UUID("0b7c1a52-6f0e-4d8e-b0f4-5b2f5e9d7a31")


@dataclass(frozen=True)
class HiddenPreference:
    """Score of a response: the fraction of its UTF-8 bytes that are in ``target``."""

    target: str = "e"

    def score(self, text: str) -> float:
        data = text.encode("utf-8")
        if not data:
            return 0.0
        wanted = set(self.target.encode("utf-8"))
        return sum(b in wanted for b in data) / len(data)

    def mean(self, texts: Sequence[str]) -> float:
        return sum(map(self.score, texts)) / max(1, len(texts))


@dataclass(frozen=True)
class Candidate:
    """One sampled response; ids and version are set when the policy server produced it."""

    text: str
    generation_id: str = ""
    model_version: str = ""


# (prompt, k) -> k candidate responses
SampleFn = Callable[[str, int], Sequence[Candidate]]


def _flip_probability(gaps: Sequence[float], sigma: float) -> float:
    """Mean P(noisy order flips a pair) when each score gets N(0, sigma²) noise."""
    if sigma <= 0:
        return 0.0
    return sum(0.5 * math.erfc(g / (2 * sigma)) for g in gaps) / len(gaps)


def noise_scale(scores: Sequence[float], noise: float) -> float:
    """The sigma whose expected fraction of flipped (untied) pairs is ``noise``."""
    gaps = [abs(a - b) for i, a in enumerate(scores) for b in scores[i + 1 :] if a != b]
    if noise <= 0 or not gaps:
        return 0.0
    if noise >= 0.5:
        return math.inf
    lo, hi = 1e-9, 1.0
    while _flip_probability(gaps, hi) < noise:
        hi *= 2
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _flip_probability(gaps, mid) < noise else (lo, mid)
    return hi


def dense_ranks(values: Sequence[float]) -> list[int]:
    """Rank 1 for the highest value; equal values share a rank; ranks are dense (1, 2, 2, 3)."""
    order = sorted(set(values), reverse=True)
    return [order.index(v) + 1 for v in values]


def noisy_ranks(scores: Sequence[float], noise: float, rng: random.Random) -> list[int]:
    """Ranks a labeler gives: by score, each untied pair flipped with probability ~``noise``."""
    sigma = noise_scale(scores, noise)
    if sigma == 0.0:
        return dense_ranks(scores)
    if math.isinf(sigma):
        return dense_ranks([rng.random() for _ in scores])
    return dense_ranks([s + rng.gauss(0.0, sigma) for s in scores])


@dataclass(frozen=True)
class Ranking:
    prompt: str
    candidates: tuple[Candidate, ...]
    ranks: tuple[int, ...]
    labeler_id: str
    user_id: str
    idempotency_key: str

    def to_event(self, split: int) -> events_pb2.ComparisonEvent:
        """The record the feedback gateway would write, for producing to Kafka directly."""
        return events_pb2.ComparisonEvent(
            event_id=uuid.uuid5(_NAMESPACE, f"comparison:{self.idempotency_key}").hex,
            created_at_ms=int(time.time() * 1000),
            prompt=self.prompt,
            responses=[
                events_pb2.RankedResponse(
                    text=c.text,
                    generation_id=c.generation_id,
                    model_version=c.model_version,
                    rank=r,
                )
                for c, r in zip(self.candidates, self.ranks, strict=True)
            ],
            labeler_id=self.labeler_id,
            user_id=self.user_id,
            split=split,  # type: ignore[arg-type]
            idempotency_key=self.idempotency_key,
        )

    def to_request(self) -> feedback_pb2.ComparisonRequest:
        """The same ranking for the feedback gateway; served responses go by generation id."""
        refs = [
            feedback_pb2.ResponseRef(generation_id=c.generation_id)
            if c.generation_id
            else feedback_pb2.ResponseRef(text=c.text)
            for c in self.candidates
        ]
        return feedback_pb2.ComparisonRequest(
            prompt=self.prompt,
            responses=refs,
            ranks=list(self.ranks),
            labeler_id=self.labeler_id,
            user_id=self.user_id,
            idempotency_key=self.idempotency_key,
        )


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str
    labeler_id: str
    user_id: str
    idempotency_key: str

    def to_event(self, split: int) -> events_pb2.DemonstrationEvent:
        return events_pb2.DemonstrationEvent(
            event_id=uuid.uuid5(_NAMESPACE, f"demonstration:{self.idempotency_key}").hex,
            created_at_ms=int(time.time() * 1000),
            prompt=self.prompt,
            response=self.response,
            labeler_id=self.labeler_id,
            user_id=self.user_id,
            split=split,  # type: ignore[arg-type]
            idempotency_key=self.idempotency_key,
        )

    def to_request(self) -> feedback_pb2.DemonstrationRequest:
        return feedback_pb2.DemonstrationRequest(
            prompt=self.prompt,
            response=self.response,
            labeler_id=self.labeler_id,
            user_id=self.user_id,
            idempotency_key=self.idempotency_key,
        )


@dataclass
class SimulatedLabeler:
    labeler_id: str
    preference: HiddenPreference = field(default_factory=HiddenPreference)
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        self._rng = random.Random(f"{self.labeler_id}:{self.seed}")
        self._count = 0

    def _key(self, kind: str) -> str:
        self._count += 1
        return f"{self.labeler_id}:{self.seed}:{kind}:{self._count}"

    def rank(self, prompt: str, user_id: str, sample: SampleFn, k: int) -> Ranking | None:
        """Asks for ``k`` responses and ranks them; None when fewer than two distinct texts
        came back or every one scores the same (a ranking must order something)."""
        distinct: dict[str, Candidate] = {}
        for candidate in sample(prompt, k):
            if candidate.text.strip():
                distinct.setdefault(candidate.text, candidate)
        candidates = tuple(distinct.values())
        scores = [self.preference.score(c.text) for c in candidates]
        if len(candidates) < 2 or len(set(scores)) < 2:
            return None
        ranks = noisy_ranks(scores, self.noise, self._rng)
        return Ranking(
            prompt, candidates, tuple(ranks), self.labeler_id, user_id, self._key("comparison")
        )

    def demonstrate(self, prompt: str, user_id: str, drafts: Sequence[str]) -> Demonstration:
        """Writes a demonstration: the draft the labeler likes best (most of the property)."""
        best = max(drafts, key=self.preference.score)
        return Demonstration(prompt, best, self.labeler_id, user_id, self._key("demonstration"))


def corpus_sentences(path: str | Path) -> list[str]:
    """Non-empty lines of a plain-text corpus (the labelers' source of prompts and drafts)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def make_prompts(sentences: Sequence[str], n: int, seed: int, start: int = 0) -> list[str]:
    """``n`` distinct prompts; the leading number keeps them apart for near-duplicate removal."""
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        words = rng.choice(sentences).split()
        out.append(f"{i:05d} {' '.join(words[: rng.randint(3, 6)])}")
    return out


def user_split(user_id: str, validation_fraction: float = 0.2, test_fraction: float = 0.2) -> int:
    """The gateway's split of a simulated user (a stable hash of the id)."""
    return split_for_user(user_id, validation_fraction, test_fraction)


def local_sampler(
    model: torch.nn.Module,
    tokenizer: object,
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    spec: EncodingSpec | None = None,
    seed: int = 0,
) -> SampleFn:
    """A ``SampleFn`` over a local causal LM (the test's stand-in for the policy server);
    prompts are encoded under ``spec`` (default: the tokenizer's, 64 prompt tokens)."""
    from rlhf.encoding import encode_prompts

    spec = spec or EncodingSpec.for_tokenizer(tokenizer, max_prompt_tokens=64)  # type: ignore[arg-type]

    generator_seed = [seed]

    @torch.no_grad()
    def sample(prompt: str, k: int) -> list[Candidate]:
        ids, mask = encode_prompts(tokenizer, spec, [prompt] * k)  # type: ignore[arg-type]
        device = next(model.parameters()).device
        generator_seed[0] += 1
        # Seeded per call so a run is reproducible whatever else consumed the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed[0])
            out = model.generate(  # type: ignore[operator]
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
            )
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)  # type: ignore[attr-defined]
        return [Candidate(t) for t in texts]

    return sample
