"""Held-out evaluation of reward models and policies (what the gates compare).

Sampling draws from a generator seeded per evaluation, so the candidate, the published policy
and the reference answer the same prompts with the same random numbers and a gate compares
like with like.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf import encoding, models
from rlhf.encoding import EncodingSpec, Prompt
from rlhf.models import RewardModel
from trainer import losses, ppo
from trainer import rm as rm_steps
from trainer import sft as sft_steps
from trainer.data import Comparison, Demonstration
from trainer.gates import PolicyEval, RMEval, WinRate


def rm_accuracy(
    rm: RewardModel,
    tok: PreTrainedTokenizerBase,
    spec: EncodingSpec,
    comparisons: Sequence[Comparison],
    batch_prompts: int = 16,
) -> RMEval:
    """Pairwise accuracy over all untied pairs of ``comparisons`` (ties in reward count half)."""
    correct = pairs = 0.0
    for i in range(0, len(comparisons), batch_prompts):
        chunk = comparisons[i : i + batch_prompts]
        batch = rm_steps.encode_rankings(
            tok,
            spec,
            [c.prompt for c in chunk],
            [list(c.responses) for c in chunk],
            [list(c.ranks) for c in chunk],
        )
        stats = rm_steps.rm_eval(rm, batch)
        correct += stats.accuracy * stats.pairs
        pairs += stats.pairs
    return RMEval(accuracy=correct / pairs if pairs else None, pairs=int(pairs))


@torch.no_grad()
def ptx_loss(
    policy: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int
) -> float | None:
    """Mean LM loss (nats/token) on held-out pretraining text."""
    if not texts:
        return None
    ids, mask = encoding.encode_texts(tok, texts, max_tokens)
    ids, mask = ids.to(policy.device), mask.to(policy.device)
    with models.autocast(policy.device):
        logits = policy(input_ids=ids, attention_mask=mask).logits
    return float(losses.ptx_loss(logits, ids, mask))


def sft_loss(
    policy: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: EncodingSpec,
    demos: Sequence[Demonstration],
    batch_size: int = 32,
) -> float | None:
    """Mean response-token CE on held-out demonstrations (batch means, averaged)."""
    if not demos:
        return None
    values = []
    for i in range(0, len(demos), batch_size):
        chunk = demos[i : i + batch_size]
        batch = encoding.encode_pairs(
            tok, spec, [d.prompt for d in chunk], [d.response for d in chunk]
        )
        values.append(sft_steps.sft_eval(policy, batch) * len(chunk))
    return sum(values) / len(demos)


@dataclass(frozen=True)
class Samples:
    """What a policy answered on the evaluation prompts, and how it scored."""

    prompts: list[Prompt]
    responses: list[str]
    rewards: list[float]
    kl: list[float]


@torch.no_grad()
def sample_and_score(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    rm: RewardModel,
    tok: PreTrainedTokenizerBase,
    spec: EncodingSpec,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 64,
    all_done: Callable[[bool], bool] | None = None,
) -> Samples:
    """One sampled response per prompt with its RM reward and KL(π || π_SFT) in nats."""
    responses: list[str] = []
    rewards: list[float] = []
    kl: list[float] = []
    # A generator of the evaluation's own: every policy evaluated with one seed draws the same
    # random numbers, and the trainer's other random streams are left alone.
    generator = torch.Generator(policy.device).manual_seed(seed)
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        # Every rank of a distributed job evaluates the same prompts; their sampling loops
        # end together (``all_done``), as each forward pass is a collective there.
        part = ppo.BatchSlice.whole(len(chunk))
        if all_done is not None:
            part = ppo.BatchSlice(part.rows, part.total, all_done)
        # The RM stands in for the value network: rollout's advantages are not used here.
        ro = ppo.rollout(
            policy,
            reference,
            rm,
            rm,
            tok,
            spec,
            chunk,
            beta=0.0,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            whiten_advantages=False,
            generator=generator,
            part=part,
        )
        responses += ro.responses
        rewards += ro.rm_score.float().cpu().tolist()
        kl += ro.kl.float().cpu().tolist()
    return Samples(list(prompts), responses, rewards, kl)


def win_rate(candidate: Sequence[float], reference: Sequence[float]) -> WinRate:
    """Per prompt, the candidate's score against the reference's (higher wins, equal ties)."""
    if len(candidate) != len(reference):
        raise ValueError(f"{len(candidate)} candidate scores but {len(reference)} reference scores")
    return WinRate.of(
        [
            1.0 if c > r else 0.5 if c == r else 0.0
            for c, r in zip(candidate, reference, strict=True)
        ]
    )


def policy_eval(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    rm: RewardModel | None,
    tok: PreTrainedTokenizerBase,
    spec: EncodingSpec,
    *,
    prompts: Sequence[Prompt],
    ptx_texts: Sequence[str],
    demos: Sequence[Demonstration],
    max_new_tokens: int,
    temperature: float,
    ptx_tokens: int,
    seed: int,
    all_done: Callable[[bool], bool] | None = None,
) -> tuple[PolicyEval, Samples | None]:
    samples = None
    if rm is not None and prompts:
        samples = sample_and_score(
            policy,
            reference,
            rm,
            tok,
            spec,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            all_done=all_done,
        )
    result = PolicyEval(
        mean_reward=sum(samples.rewards) / len(samples.rewards) if samples else None,
        kl=sum(samples.kl) / len(samples.kl) if samples else None,
        ptx_loss=ptx_loss(policy, tok, ptx_texts, ptx_tokens),
        sft_loss=sft_loss(policy, tok, spec, demos),
        prompts=len(prompts) if samples else 0,
    )
    return result, samples
