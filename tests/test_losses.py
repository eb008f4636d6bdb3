"""Every loss, GAE and the KL controllers against numbers worked by hand (in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer import losses

LN2, LN3 = math.log(2.0), math.log(3.0)


def close(a: torch.Tensor | float, b: float | list, tol: float = 1e-6) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.tensor(b), atol=tol)


def test_rm_ranking_loss_k3_averages_all_three_pairs() -> None:
    # rewards (2, 1, 0), ranks (1, 2, 3): pairs (0,1) Δ=1, (0,2) Δ=2, (1,2) Δ=1.
    # -log σ(Δ) = softplus(-Δ): softplus(-1) = ln(1 + e^-1) = 0.31326169,
    # softplus(-2) = ln(1 + e^-2) = 0.12692801.  loss = (2·0.31326169 + 0.12692801) / C(3,2)=3
    # = 0.75345139 / 3 = 0.25115046
    loss = losses.rm_ranking_loss(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[1, 2, 3]]),
                                  torch.ones(1, 3))  # fmt: skip
    assert close(loss, 0.25115046)


def test_rm_ranking_loss_ties_padding_and_pairless_prompts() -> None:
    rewards = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 3.0, 9.0], [5.0, 1.0, 0.0, 0.0]])
    ranks = torch.tensor([[1, 2, 3, 0], [1, 2, 2, 0], [1, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    # Row 0: as above, 0.25115046 (the padded slot 3, rank 0, would otherwise "win" everything).
    # Row 1: responses 1 and 2 tie -> no pair; pairs (0,1) Δ=-1 and (0,2) Δ=-3:
    #   softplus(1) = 1.31326169, softplus(3) = 3.04858735; divided by the 2 untied pairs
    #   = 2.18092452.
    # Row 2: a full tie: no pairs, so it is left out of the mean.
    # loss = (0.25115046 + 2.18092452) / 2 = 1.21603749
    assert close(losses.rm_ranking_loss(rewards, ranks, mask), 1.21603749)
    # Accuracy: row 0 gets 3/3 pairs right, row 1 0/2 -> (3, 5).
    assert losses.rm_pair_accuracy(rewards, ranks, mask) == (3.0, 5.0)
    # Equal rewards count half: one pair, Δ=0.
    assert losses.rm_pair_accuracy(torch.zeros(1, 2), torch.tensor([[1, 2]]), torch.ones(1, 2)) == (
        0.5,
        1.0,
    )


def test_rm_ranking_loss_k2_is_bradley_terry() -> None:
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(16, 2, generator=g)
    ranks = torch.tensor([[1, 2], [2, 1]]).repeat(8, 1)
    chosen = torch.where(ranks[:, 0] == 1, rewards[:, 0], rewards[:, 1])
    rejected = torch.where(ranks[:, 0] == 1, rewards[:, 1], rewards[:, 0])
    bt = -F.logsigmoid(chosen - rejected).mean()
    assert torch.allclose(losses.rm_ranking_loss(rewards, ranks, torch.ones(16, 2)), bt)


def test_rm_ranking_loss_with_no_pairs_is_zero_and_differentiable() -> None:
    rewards = torch.ones(2, 2, requires_grad=True)
    loss = losses.rm_ranking_loss(rewards, torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2))
    loss.backward()
    assert loss.item() == 0.0 and rewards.grad is not None


def _lm_case() -> tuple[torch.Tensor, torch.Tensor]:
    # Vocabulary of 2. Position 0's logits (0, 0) give p(token 1) = 1/2; position 1's logits
    # (ln 3, 0) give p(token 1) = 1/(3+1) = 1/4. The sequence is (0, 1, 1).
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [0.0, 0.0]]])
    return logits, torch.tensor([[0, 1, 1]])


def test_token_logprobs_and_entropy() -> None:
    logits, ids = _lm_case()
    assert close(losses.token_logprobs(logits, ids), [[-LN2, -math.log(4.0)]])
    # H(1/2, 1/2) = ln 2; H(3/4, 1/4) = 0.75·0.28768207 + 0.25·1.38629436 = 0.56233514
    assert close(losses.entropy_from_logits(logits[0, :2]), [LN2, 0.56233514])


def test_sft_loss_counts_response_tokens_only() -> None:
    logits, ids = _lm_case()
    # Both targets are response tokens: (ln 2 + ln 4) / 2 = 1.5 ln 2 = 1.03972077
    assert close(losses.sft_loss(logits, ids, torch.tensor([[0, 1, 1]])), 1.03972077)
    # Only the last token is a response token: ln 4 = 1.38629436
    assert close(losses.sft_loss(logits, ids, torch.tensor([[0, 0, 1]])), 1.38629436)


def test_ptx_loss_skips_padding() -> None:
    logits, ids = _lm_case()
    assert close(losses.ptx_loss(logits, ids, torch.tensor([[1, 1, 1]])), 1.5 * LN2)
    # The last position is padding: only the first target counts, ln 2.
    assert close(losses.ptx_loss(logits, ids, torch.tensor([[1, 1, 0]])), LN2)


def test_kl_penalized_rewards() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [0.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0, 0.0], [0.0, -2.0, -1.0, -1.5]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    # β = 0.1. Row 0: -0.1·(0.5, -1, 0) = (-0.05, 0.1, 0); RM score 2 added at the last
    # masked token (index 2): (-0.05, 0.1, 2.0, 0).
    # Row 1: -0.1·(·, 1, 0, 0.5) = (0, -0.1, 0, -0.05); RM score -1 at index 3: -1.05.
    out = losses.kl_penalized_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.1)
    assert close(out, [[-0.05, 0.1, 2.0, 0.0], [0.0, -0.1, 0.0, -1.05]])


def test_gae_no_discount() -> None:
    # γ=1, λ=0.5, rewards (0, 0, 1), values (0.5, 0.2, 0.4), value after the end 0:
    # t=2: δ = 1 + 0 - 0.4 = 0.6;      A = 0.6
    # t=1: δ = 0 + 0.4 - 0.2 = 0.2;    A = 0.2 + 0.5·0.6 = 0.5
    # t=0: δ = 0 + 0.2 - 0.5 = -0.3;   A = -0.3 + 0.5·0.5 = -0.05
    # returns = A + V = (0.45, 0.7, 1.0)
    adv, ret = losses.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.4]]),
                          torch.ones(1, 3), gamma=1.0, lam=0.5)  # fmt: skip
    assert close(adv, [[-0.05, 0.5, 0.6]])
    assert close(ret, [[0.45, 0.7, 1.0]])


def test_gae_respects_the_mask_and_discount() -> None:
    # Mask (0, 1, 1, 0): the episode is tokens 1..2. γ=0.5, λ=1 (Monte-Carlo returns).
    # t=2: δ = 2 + 0.5·0 - 1 = 1;   A = 1
    # t=1: δ = 1 + 0.5·1 - 1 = 0.5; A = 0.5 + 0.5·1·1 = 1
    # returns (0, 2, 2, 0): r1 + γ r2 = 1 + 0.5·2 = 2 and r2 = 2, as Monte-Carlo says.
    adv, ret = losses.gae(torch.tensor([[9.0, 1.0, 2.0, 9.0]]), torch.tensor([[7.0, 1.0, 1.0, 7.0]]),
                          torch.tensor([[0, 1, 1, 0]]), gamma=0.5, lam=1.0)  # fmt: skip
    assert close(adv, [[0.0, 1.0, 1.0, 0.0]])
    assert close(ret, [[0.0, 2.0, 2.0, 0.0]])


def test_ppo_policy_loss_clips_and_counts() -> None:
    # clip 0.2.  token: ratio, A -> -A·ρ, -A·clip(ρ), max, clipped?
    #   1: 1.5,  1 -> -1.5, -1.2 -> -1.2 yes
    #   2: 0.5,  1 -> -0.5, -0.8 -> -0.5 no
    #   3: 0.5, -2 ->  1.0,  1.6 ->  1.6 yes
    #   4: 1.0,  3 -> -3.0, -3.0 -> -3.0 no
    #   5: masked out (ratio 10, A 100)
    # loss = (-1.2 - 0.5 + 1.6 - 3.0) / 4 = -0.775; clip_frac = 2/4 = 0.5
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.0, 10.0]])
    old = torch.full_like(ratio, -2.0)
    adv = torch.tensor([[1.0, 1.0, -2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, frac = losses.ppo_policy_loss(old + ratio.log(), old, adv, mask, clip=0.2)
    assert close(loss, -0.775) and close(frac, 0.5)


def test_value_loss_is_clipped() -> None:
    # clip 0.2.  V, V_old, R -> (V-R)², (clip(V)-R)², max
    #   1.0, 0.5, 1.0 -> 0,    (0.7-1)² = 0.09 -> 0.09
    #   0.6, 0.5, 0.0 -> 0.36, (0.6-0)² = 0.36 -> 0.36
    #   0.0, 1.0, 2.0 -> 4,    (0.8-2)² = 1.44 -> 4
    # ½ · (0.09 + 0.36 + 4) / 3 = 0.74166667
    v = torch.tensor([[1.0, 0.6, 0.0]])
    old = torch.tensor([[0.5, 0.5, 1.0]])
    ret = torch.tensor([[1.0, 0.0, 2.0]])
    assert close(losses.value_loss(v, old, ret, torch.ones(1, 3), clip=0.2), 0.74166667)


def test_whiten_and_masked_mean() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert close(losses.masked_mean(x, mask), 2.0)
    # mean 2, variance (1 + 0 + 1)/3 = 2/3, std 0.81649658 -> ±1/0.81649658 = ±1.22474487
    assert close(losses.whiten(x, mask), [[-1.22474487, 0.0, 1.22474487, 0.0]], tol=1e-5)


def test_kl_controllers() -> None:
    fixed = losses.FixedKLController(0.02)
    fixed.update(100.0, 64)
    assert fixed.value == 0.02
    kl = losses.AdaptiveKLController(0.1, target=6.0, horizon=100)
    # KL 9 vs target 6: error 0.5 clipped to 0.2; β = 0.1 · (1 + 0.2·10/100) = 0.102
    kl.update(9.0, 10)
    assert kl.value == pytest.approx(0.102)
    # KL 5.4: error -0.1; β = 0.102 · (1 - 0.1·50/100) = 0.0969
    kl.update(5.4, 50)
    assert kl.value == pytest.approx(0.0969)
