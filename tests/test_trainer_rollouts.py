"""Rollouts sample exactly from the distribution PPO trains on, and a response cut by the
length limit is treated as configured (tiny models of both families, CPU, seeded)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rlhf import encoding, models
from rlhf.encoding import EncodingSpec
from trainer import losses
from trainer.ppo import ppo_step, rollout, sample, value_model_from_rm

PROMPTS = ["say hi", "count: 1 2 3 4", "name a colour", "?"]


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tiny(request: pytest.FixtureRequest, family_models: Callable[[str], Path]) -> Path:
    return family_models(request.param)


def _spec(tok: object) -> EncodingSpec:
    """The family's own encoding: the BPE family's prompts go through its chat template."""
    return EncodingSpec.for_tokenizer(tok, max_prompt_tokens=64, max_response_tokens=64)  # type: ignore[arg-type]


def _setup(tiny: Path, sharpen: float = 1.0) -> tuple:
    policy, tok = models.load_policy(tiny / "policy")
    with torch.no_grad():  # larger logits: a peaked distribution that temperature changes
        policy.model.norm.weight.mul_(sharpen)
    ref, _ = models.load_policy(tiny / "policy")
    rm, _ = models.load_reward_model(tiny / "reward")
    with torch.no_grad():
        rm.head.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    return policy, ref, rm, value_model_from_rm(rm), tok


def test_the_sampler_follows_the_full_forward_pass_on_left_padded_prompts(tiny):
    # Near-zero temperature makes sampling greedy: each sampled token must be the argmax of
    # a plain full forward pass over prompt + response, so the cached, left-padded loop
    # sees the same positions and context as the scoring pass.
    policy, _, _, _, tok = _setup(tiny, sharpen=4.0)
    ids, mask = encoding.encode_prompts(tok, _spec(tok), PROMPTS)
    cut = sample(policy, ids, mask, max_new_tokens=8, eos={tok.eos_token_id}, temperature=1e-4,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    for i, (tokens, _) in enumerate(cut):
        prompt = ids[i][mask[i].bool()].tolist()
        full = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = policy(input_ids=full).logits[0]
        greedy = logits[len(prompt) - 1 : len(full[0]) - 1].argmax(dim=-1).tolist()
        assert tokens == greedy


def test_rollouts_ignore_the_models_generation_config(tiny):
    # A checkpoint may ship a generation_config with processors (here a huge repetition
    # penalty, which forbids any token already in the context). PPO's ratio assumes samples
    # from π itself, so rollouts must not apply them: repeats are common under π.
    policy, ref, rm, value, tok = _setup(tiny)
    policy.generation_config.repetition_penalty = 1e9
    policy.generation_config.no_repeat_ngram_size = 1
    ro = rollout(policy, ref, value, rm, tok, _spec(tok), PROMPTS * 4, beta=0.0, max_new_tokens=24,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    repeats = 0
    for row, am in zip(ro.input_ids, ro.action_mask, strict=True):
        response = row[1:][am.bool()].tolist()
        repeats += len(response) - len(set(response))
    assert repeats > 0


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_rollout_logprobs_are_those_of_the_sampling_distribution(tiny, temperature):
    # For tokens drawn from p, E[log p(token)] = -H(p). Stored log-probs from a different
    # distribution than the one sampled (raw logits while sampling at T = 0.5) break this.
    policy, ref, rm, value, tok = _setup(tiny, sharpen=6.0)
    ro = rollout(policy, ref, value, rm, tok, _spec(tok), PROMPTS * 32, beta=0.0, max_new_tokens=8,
                 temperature=temperature, generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        logits = policy(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits
    entropy = losses.entropy_from_logits(logits[:, :-1] / temperature)
    mean_logp = float(losses.masked_mean(ro.logp, ro.action_mask))
    mean_entropy = float(losses.masked_mean(entropy, ro.action_mask))
    assert mean_logp == pytest.approx(-mean_entropy, abs=0.1), (mean_logp, mean_entropy)
    # ... and the first PPO step starts exactly on-policy at that temperature.
    opt = torch.optim.AdamW([*policy.parameters(), *value.parameters()], lr=1e-4)
    first = next(ro.minibatches(16, torch.Generator().manual_seed(0)))
    stats = ppo_step(policy, value, opt, first, temperature=temperature)
    assert stats.approx_kl == pytest.approx(0.0, abs=1e-5) and stats.clip_frac == 0.0


def test_a_response_cut_by_the_length_limit_pays_the_missing_eos_penalty(tiny):
    policy, ref, rm, value, tok = _setup(tiny)
    kwargs = dict(beta=0.0, max_new_tokens=6, whiten_advantages=False)
    plain = rollout(policy, ref, value, rm, tok, _spec(tok), PROMPTS * 8, **kwargs,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    penalised = rollout(policy, ref, value, rm, tok, _spec(tok), PROMPTS * 8, **kwargs, missing_eos_penalty=2.5,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(plain.input_ids, penalised.input_ids)  # same samples
    assert (~penalised.ended).any()
    # The RM's own score is reported unchanged; the episode's return carries the penalty.
    assert torch.allclose(plain.rm_score, penalised.rm_score)
    expected = plain.rm_score - 2.5 * (~penalised.ended).float()
    assert torch.allclose(penalised.rewards.sum(dim=1), expected, atol=1e-5)
    assert torch.allclose(plain.rewards.sum(dim=1), plain.rm_score, atol=1e-5)
