"""The SFT, RM and PPO-ptx steps on the tiny models of both families (CPU, seeded, fast)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from rlhf import encoding, models
from rlhf.encoding import EncodingSpec
from trainer import losses
from trainer.ppo import Rollout, ema_update, ppo_step, rollout, value_model_from_rm
from trainer.rm import RankBatch, encode_rankings, fit_bias, rm_eval, rm_step
from trainer.sft import sft_eval, sft_step

PROMPTS = ["say hi", "count: 1 2", "name a colour", "what is up"]


@dataclass(frozen=True)
class Tiny:
    path: Path
    spec: EncodingSpec  # chat template on for the BPE family

    def __truediv__(self, name: str) -> Path:
        return self.path / name


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tiny(request: pytest.FixtureRequest, family_models: Callable[[str], Path]) -> Tiny:
    path = family_models(request.param)
    tok = models.load_tokenizer(path / "policy")
    return Tiny(path, EncodingSpec.for_tokenizer(tok, max_prompt_tokens=64, max_response_tokens=64))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def test_sft_step_reduces_response_cross_entropy(tiny: Tiny) -> None:
    policy, tok = models.load_policy(tiny / "policy")
    responses = ["hi!", "3 4 5", "blue", "not much"]
    batch = encoding.encode_pairs(tok, tiny.spec, PROMPTS, responses)
    ptx = encoding.encode_texts(tok, ["the quick brown fox jumps over the lazy dog"], 32)
    before = sft_eval(policy, batch)
    opt = _adam(list(policy.parameters()), 3e-3)
    stats = [sft_step(policy, opt, batch, ptx=ptx, ptx_coef=0.5) for _ in range(8)]
    after = sft_eval(policy, batch)
    assert before == pytest.approx(stats[0].loss, rel=1e-5)
    assert after < before - 0.5, (before, after)
    # Response tokens + EOS (the byte family: 4 + 6 + 5 + 9).
    assert stats[0].tokens == sum(len(encoding.response_ids(tok, tiny.spec, r)) for r in responses)
    assert stats[0].ptx_loss > 0 and not policy.training


def _toy_rankings(tok: PreTrainedTokenizerBase, spec: EncodingSpec) -> RankBatch:
    # The hidden preference: more exclamation marks is better; K = 3, 2 and 4 (with a tie).
    responses = [["ok!!!", "ok!", "ok"], ["sure", "sure!!"], ["a!!", "b!!", "c", "d!!!!"]]
    ranks = [[1, 2, 3], [2, 1], [2, 2, 3, 1]]
    return encode_rankings(tok, spec, PROMPTS[:3], responses, ranks)


def test_rm_step_reduces_the_ranking_loss(tiny: Tiny) -> None:
    rm, tok = models.load_reward_model(tiny / "reward")
    batch = _toy_rankings(tok, tiny.spec)
    # Each response is forwarded once: 3 + 2 + 4 rows, in a (3, 4) grid.
    assert batch.input_ids.shape[0] == 9 and batch.mask.tolist() == [
        [1, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
    ]
    first = rm_eval(rm, batch)
    # A fresh RM scores everything 0: every pair costs ln 2, every pair is a coin flip.
    # Pairs: C(3,2)=3, 1, and C(4,2)-1 tie = 5 -> 9.
    assert first.loss == pytest.approx(0.693147, abs=1e-5)
    assert (first.pairs, first.accuracy) == (9, 0.5)
    opt = _adam(list(rm.parameters()), 3e-3)
    for _ in range(10):
        rm_step(rm, opt, batch)
    last = rm_eval(rm, batch)
    assert last.loss < 0.4 and last.accuracy == 1.0, last


def test_fit_bias_makes_demonstrations_average_zero(tiny: Tiny) -> None:
    rm, tok = models.load_reward_model(tiny / "reward")
    with torch.no_grad():
        rm.head.weight.normal_()
        rm.head.bias.fill_(3.0)
    demos = ["hi!", "3 4 5", "blue", "not much"]
    bias = fit_bias(rm, tok, tiny.spec, PROMPTS, demos, batch_size=3)  # two batches
    assert bias == pytest.approx(float(rm.bias))
    assert abs(float(models.score(rm, tok, tiny.spec, PROMPTS, demos).mean())) < 1e-5
    # Raw rewards are untouched: the bias alone does the normalisation.
    batch = encoding.encode_pairs(tok, tiny.spec, PROMPTS, demos)
    raw = rm.raw(batch.input_ids, batch.attention_mask)
    assert raw.mean().item() == pytest.approx(-bias, abs=1e-5)


def _ppo_setup(tiny: Tiny) -> tuple:
    policy, tok = models.load_policy(tiny / "policy")
    ref, _ = models.load_policy(tiny / "policy")
    ref.requires_grad_(False)
    rm, _ = models.load_reward_model(tiny / "reward")
    with torch.no_grad():  # a reward model with some opinion, so rewards are not all 0
        rm.head.weight.normal_(std=0.5)
    value = value_model_from_rm(rm)
    return policy, ref, rm, value, tok


def test_rollout_scores_episodes_consistently(tiny: Tiny) -> None:
    policy, ref, rm, value, tok = _ppo_setup(tiny)
    ro = rollout(policy, ref, value, rm, tok, tiny.spec, PROMPTS, beta=0.1, max_new_tokens=6)
    assert len(ro) == 4 and len(ro.responses) == 4
    n_actions = ro.action_mask.sum(dim=1)
    assert ((n_actions >= 1) & (n_actions <= 6)).all()
    # The policy IS the reference at the start: zero KL, and the rewards sum to the RM score.
    assert torch.allclose(ro.kl, torch.zeros(4), atol=1e-5)
    assert torch.allclose(ro.rewards.sum(dim=1), ro.rm_score, atol=1e-5)
    # The value network starts as a copy of the RM: the value of the state before the last
    # token is the RM's head one position earlier than the score.
    per_token = rm.per_token(ro.input_ids, ro.attention_mask) + rm.bias
    last = ro.attention_mask.sum(dim=1) - 1
    assert torch.allclose(per_token[torch.arange(4), last], ro.rm_score, atol=1e-5)
    assert torch.allclose(
        ro.values[torch.arange(4), last - 1], per_token[torch.arange(4), last - 1], atol=1e-5
    )
    # Advantages are whitened over response tokens; nothing leaks onto prompt or padding.
    assert float(losses.masked_mean(ro.advantages, ro.action_mask)) == pytest.approx(0, abs=1e-5)
    assert (ro.advantages[ro.action_mask == 0] == 0).all()
    # Responses cut by EOS end with it; others used the whole length.
    for i in range(4):
        final = int(ro.input_ids[i, int(last[i])])
        assert bool(ro.ended[i]) == (final == tok.eos_token_id)
        assert bool(ro.ended[i]) or int(n_actions[i]) == 6


def test_ppo_step_runs_and_starts_on_policy(tiny: Tiny) -> None:
    policy, ref, rm, value, tok = _ppo_setup(tiny)
    ro = rollout(policy, ref, value, rm, tok, tiny.spec, PROMPTS, beta=0.02, max_new_tokens=8)
    ptx = encoding.encode_texts(tok, ["some pretraining text.", "more of it, longer."], 24)
    opt = _adam([*policy.parameters(), *value.parameters()], 1e-3)
    ema = copy.deepcopy(policy)
    mbs = list(ro.minibatches(2, torch.Generator().manual_seed(0)))
    assert sorted(p for mb in mbs for p in mb.prompts) == sorted(PROMPTS)
    first = ppo_step(policy, value, opt, mbs[0], ptx=ptx, gamma_ptx=1.0)
    # The first minibatch is exactly on-policy: ratio 1, nothing clipped.
    assert first.approx_kl == pytest.approx(0.0, abs=1e-5) and first.clip_frac == 0.0
    assert first.ptx_loss > 0 and first.entropy > 0 and first.episodes == 2
    second = ppo_step(policy, value, opt, mbs[1], ptx=ptx, gamma_ptx=1.0)
    assert all(torch.isfinite(torch.tensor(v)) for v in vars(second).values())
    ema_update(ema, policy, decay=0.992)
    p0, p_ema, p_new = (next(m.parameters()) for m in (ref, ema, policy))
    assert torch.allclose(p_ema, 0.992 * p0 + 0.008 * p_new, atol=1e-6)


def test_ppo_and_ptx_gradients_are_accumulated_into_one_step(tiny: Tiny) -> None:
    policy, ref, rm, value, tok = _ppo_setup(tiny)
    ro: Rollout = rollout(
        policy, ref, value, rm, tok, tiny.spec, PROMPTS, beta=0.02, max_new_tokens=6
    )
    ptx_ids, ptx_mask = encoding.encode_texts(tok, ["pretraining text", "more"], 16)
    gamma_ptx, vf_coef = 3.0, 0.5

    # The gradients of each pass, computed separately on copies.
    pol_a, val_a = copy.deepcopy(policy), copy.deepcopy(value)
    logp = losses.token_logprobs(
        pol_a(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits, ro.input_ids
    )
    values = val_a.per_token(ro.input_ids, ro.attention_mask)[:, :-1] + val_a.bias
    pg, _ = losses.ppo_policy_loss(logp, ro.logp, ro.advantages, ro.action_mask, 0.2)
    vl = losses.value_loss(values, ro.values, ro.returns, ro.action_mask, 0.2)
    (pg + vf_coef * vl).backward()
    pol_b = copy.deepcopy(policy)
    ptx_logits = pol_b(input_ids=ptx_ids, attention_mask=ptx_mask).logits
    losses.ptx_loss(ptx_logits, ptx_ids, ptx_mask).backward()

    # One SGD step with lr 1 and no clipping moves each weight by minus its gradient.
    opt = torch.optim.SGD([*policy.parameters(), *value.parameters()], lr=1.0)
    before = [p.detach().clone() for p in policy.parameters()]
    value_before = [p.detach().clone() for p in value.parameters()]
    ppo_step(policy, value, opt, ro, ptx=(ptx_ids, ptx_mask), gamma_ptx=gamma_ptx,
             vf_coef=vf_coef, max_grad_norm=None)  # fmt: skip
    for p0, p1, pa, pb in zip(
        before, policy.parameters(), pol_a.parameters(), pol_b.parameters(), strict=True
    ):
        expected = (pa.grad if pa.grad is not None else 0) + gamma_ptx * pb.grad
        assert torch.allclose(p0 - p1, expected, atol=1e-5, rtol=1e-4)
    assert any(float(pb.grad.abs().sum()) > 0 for pb in pol_b.parameters())
    # The value network gets the value-loss gradient only (the ptx pass does not touch it).
    for v0, v1, va in zip(value_before, value.parameters(), val_a.parameters(), strict=True):
        expected = va.grad if va.grad is not None else torch.zeros_like(v0)
        assert torch.allclose(v0 - v1, expected, atol=1e-5, rtol=1e-4)


def test_ppo_raises_the_reward_it_is_trained_on(family_models: Callable[[str], Path]) -> None:
    # The byte family: its 259-token vocabulary learns a preference within 8 tiny steps.
    tiny = Tiny(family_models("byte"), EncodingSpec(max_prompt_tokens=64, max_response_tokens=64))
    policy, ref, rm, value, tok = _ppo_setup(tiny)
    with torch.no_grad():
        rm.head.weight.normal_(std=0.1)
    value = value_model_from_rm(rm)
    opt = _adam([*policy.parameters(), *value.parameters()], 3e-3)
    prompts = [f"prompt {i}" for i in range(16)]

    def mean_reward() -> float:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            ro = rollout(
                policy, ref, value, rm, tok, tiny.spec, prompts * 4, beta=0.02, max_new_tokens=8
            )
        return ro.rm_score.mean().item()

    before = mean_reward()
    for _ in range(8):
        ro = rollout(policy, ref, value, rm, tok, tiny.spec, prompts, beta=0.02, max_new_tokens=8)
        for mb in ro.minibatches(8):
            ppo_step(policy, value, opt, mb)
    after = mean_reward()
    # Measured here: 0.17 -> 0.38 (other seeds of this setup gained 0.13 to 0.17).
    assert after > before + 0.05, (before, after)
