"""Losses, advantages and KL control of InstructGPT (PAPER.md): pure tensor functions.

Nothing here touches a model. Per-token tensors of a batch are "action aligned": index i is
the token at position i+1 of the sequence, predicted from positions 0..i, so with logits
(B, T, V) from the model:

    token_logprobs(logits, input_ids) -> (B, T-1)   log p(input_ids[:, i+1] | prefix)
    action mask = response_mask[:, 1:]             1 on generated/response tokens
    values[:, i] = value head at position i         (the state that chose token i+1)

    rm_ranking_loss(rewards (B,K), ranks (B,K), mask (B,K)) -> scalar
    rm_pair_accuracy(rewards, ranks, mask) -> (correct, pairs)  as floats
    sft_loss(logits, input_ids, response_mask) -> scalar   CE on response tokens only
    ptx_loss(logits, input_ids, attention_mask) -> scalar  LM loss on pretraining text
    kl_penalized_rewards(rm_score (B,), logp, logp_ref, mask, beta) -> (B, T-1)
    gae(rewards, values, mask, gamma=1.0, lam=0.95) -> (advantages, returns)
    ppo_policy_loss(logp, old_logp, advantages, mask, clip=0.2) -> (loss, clip_frac)
    value_loss(values, old_values, returns, mask, clip=0.2) -> scalar
    entropy_from_logits(logits) -> logits.shape[:-1]
    masked_mean(x, mask), whiten(x, mask)
    FixedKLController(beta), AdaptiveKLController(beta, target, horizon):
        .value, .update(current_kl, n_episodes)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over positions where `mask` is 1 (0 if the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over masked positions; zero outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(input_ids[:, i+1] | input_ids[:, :i+1]) for i in 0..T-2, as (B, T-1) fp32."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: logsumexp(z) - sum(p * z)."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


# --------------------------------------------------------------------------- reward model


def _pairs(ranks: Tensor, mask: Tensor) -> Tensor:
    """(B, K, K) float: 1 where response i is strictly better than j (rank 1 is best)."""
    valid = mask.bool()
    better = ranks[:, :, None] < ranks[:, None, :]
    return (better & valid[:, :, None] & valid[:, None, :]).float()


def rm_ranking_loss(rewards: Tensor, ranks: Tensor, mask: Tensor) -> Tensor:
    """The K-way ranking loss of PAPER.md for a batch of B prompts with up to K responses.

    Row b holds one prompt's K responses (each forwarded once; padded slots have mask 0).
    Every ordered pair (w, l) with rank_w < rank_l contributes -log σ(r_w - r_l). A prompt's
    pairs are averaged, i.e. divided by C(K,2) when there are no ties; tied responses form no
    pair, so with ties the divisor is the number of untied pairs. The batch loss is the mean
    over prompts that have at least one pair. For K=2 this is the Bradley-Terry loss.
    """
    pairs = _pairs(ranks, mask)
    diff = rewards[:, :, None] - rewards[:, None, :]
    per_pair = -F.logsigmoid(diff.float()) * pairs
    n_pairs = pairs.sum(dim=(1, 2))
    has_pairs = n_pairs > 0
    per_prompt = per_pair.sum(dim=(1, 2))[has_pairs] / n_pairs[has_pairs]
    return per_prompt.mean() if per_prompt.numel() else rewards.sum() * 0.0


@torch.no_grad()
def rm_pair_accuracy(rewards: Tensor, ranks: Tensor, mask: Tensor) -> tuple[float, float]:
    """(correct, pairs) over all untied pairs: r_w > r_l is correct, r_w == r_l half."""
    pairs = _pairs(ranks, mask)
    diff = rewards[:, :, None] - rewards[:, None, :]
    correct = ((diff > 0).float() + 0.5 * (diff == 0).float()) * pairs
    return float(correct.sum()), float(pairs.sum())


# --------------------------------------------------------------------------- LM losses


def sft_loss(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Next-token cross-entropy on response tokens only, averaged over those tokens."""
    return -masked_mean(token_logprobs(logits, input_ids), response_mask[:, 1:])


def ptx_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Language-model loss on pretraining text: CE on every non-pad next token."""
    return -masked_mean(token_logprobs(logits, input_ids), attention_mask[:, 1:])


# --------------------------------------------------------------------------- PPO


def kl_penalized_rewards(
    rm_score: Tensor, logp: Tensor, logp_ref: Tensor, mask: Tensor, beta: float
) -> Tensor:
    """Per-token reward -β (log π - log π_SFT), plus the RM score at each row's last masked
    token: summed over a response this is R(x, y) = r(x, y) - β log(π(y|x) / π_SFT(y|x))."""
    mask = mask.to(logp.dtype)
    rewards = -beta * (logp - logp_ref) * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(dim=1)
    return rewards.scatter_add(1, last[:, None], rm_score[:, None].to(rewards.dtype))


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the masked (contiguous) tokens of each row.

    δ_t = r_t + γ V_{t+1} - V_t, A_t = δ_t + γλ A_{t+1}; the value after the last token is 0
    (the episode ends). Returns (advantages, returns = advantages + values), zero off-mask.
    """
    mask = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = adv
        # Off-mask positions pass nothing back: the row's episode has not started or has ended.
        next_value = torch.where(mask[:, t] > 0, values[:, t], torch.zeros_like(next_value))
        next_adv = adv
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped surrogate: mean over tokens of max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)), ρ = π/π_old.

    Returns (loss, clip_frac): the fraction of tokens whose clipped term was the larger one.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac.detach()


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> Tensor:
    """Clipped value loss: ½ · mean max((V - R)², (clip(V, V_old ± ε) - R)²)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class FixedKLController:
    """β stays as given (the paper's choice: β = 0.02)."""

    def __init__(self, beta: float) -> None:
        self.value = beta

    def update(self, current_kl: float, n_episodes: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Ziegler et al. (2019): β ← β · (1 + clip(KL/target - 1, ±0.2) · n / horizon)."""

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be > 0")
        self.value = beta
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_episodes: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon
