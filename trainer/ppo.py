"""Step 3 of InstructGPT: PPO-ptx against the reward model, per-token KL to the SFT policy.

    rollout(policy, ref_policy, value_model, reward_model, tok, spec, prompts, *, beta,
            max_new_tokens=32, temperature=1.0, gamma=1.0, lam=0.95,
            whiten_advantages=True, missing_eos_penalty=0.0, generator=None) -> Rollout
        Samples one response per prompt (rendered and truncated by `rlhf.encoding` under
        `spec`, as the policy server does) from the current policy (`sample`: exactly
        softmax(logits / temperature), temperature 1 in the paper), then scores it: behaviour
        and reference log-probs of that same distribution, values, the RM's normalised
        reward, the KL-penalised per-token rewards r(x,y) - missing_eos_penalty (when cut by
        the length limit) at the last token - β·(log π - log π_SFT) at every token, and GAE.
    sample(policy, ids, mask, *, max_new_tokens, eos, temperature=1.0, generator=None)
        The sampler: a KV-cached loop over plain forward passes, no generation_config.
    ppo_step(policy, value_model, optimizer, batch, *, ptx=None, gamma_ptx=0.0, clip=0.2,
             value_clip=0.2, vf_coef=0.5, max_grad_norm=1.0, temperature=1.0) -> PPOStats
        One optimizer step on a minibatch of a Rollout (`Rollout.minibatches`): the clipped
        surrogate + vf_coef·clipped value loss in one backward pass, then gamma_ptx·LM loss on
        `ptx` = (input_ids, attention_mask) in a second backward pass accumulated into the same
        gradients, then ONE optimizer.step().
    ppo_backward(policy, value_model, batch, *, ..., weight=1.0, ptx_weight=1.0) -> PPOStats
        Its backward passes alone: weighted gradients accumulate (micro-batches, ranks).
    concat_rollouts(parts), whiten_rollout(ro)   data-parallel rollouts made whole again
    ema_update(ema_model, model, decay=0.992)      EMA of policy weights (paper)
    value_model_from_rm(rm) -> RewardModel         the value network

Choices: the value network is a separate copy of the reward model (the paper initialises the
value function from the RM); V at position i is its head output at i plus the RM bias, i.e.
it starts as the RM's own score of each prefix. `optimizer` holds the parameters of both the
policy and the value network (e.g. one AdamW, betas (0.9, 0.95)). The reference policy is the
frozen SFT model, loaded with the policy's dtype (fp32 weights for both, under bf16
autocast on CUDA; a bf16 reference next to an fp32 policy would show rounding as KL). Models stay in eval
mode (no dropout), so a rollout's log-probs are exactly the ones PPO's ratio starts from. On
CUDA the forwards run under bf16 autocast.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf import encoding, models
from rlhf.encoding import EncodingSpec, Prompt
from rlhf.models import RewardModel
from trainer import losses
from trainer.distributed import clip_and_step


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Scored episodes. Per-token tensors are action aligned (B, T-1): index i is token i+1."""

    prompts: list[Prompt]
    responses: list[str]
    input_ids: Tensor  # (B, T) prompt + response, right-padded
    attention_mask: Tensor  # (B, T)
    action_mask: Tensor  # (B, T-1) 1 on response tokens
    logp: Tensor  # log π_old of each response token
    ref_logp: Tensor  # log π_SFT
    values: Tensor  # V before each response token
    rm_score: Tensor  # (B,) normalised RM reward
    rewards: Tensor  # KL-penalised per-token rewards
    advantages: Tensor
    returns: Tensor
    ended: Tensor  # (B,) True where the response ended with EOS (not cut by length)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def kl(self) -> Tensor:
        """(B,) log π_old(y|x) - log π_SFT(y|x) of each episode (nats)."""
        return ((self.logp - self.ref_logp) * self.action_mask).sum(dim=1)

    def select(self, idx: Tensor) -> Rollout:
        picked: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            picked[f.name] = (
                value[idx.to(value.device)]
                if isinstance(value, Tensor)
                else [value[i] for i in idx.tolist()]
            )
        return Rollout(**picked)  # type: ignore[arg-type]

    def to(self, device: str | torch.device) -> Rollout:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Rollout(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in moved.items()})  # type: ignore[arg-type]  # fmt: skip

    def minibatches(self, size: int, generator: torch.Generator | None = None) -> Iterator[Rollout]:
        """Shuffled minibatches covering every episode once (one PPO epoch)."""
        order = torch.randperm(len(self), generator=generator)
        for i in range(0, len(self), size):
            yield self.select(order[i : i + size])


@dataclasses.dataclass(frozen=True)
class BatchSlice:
    """The rows ``rows`` of a ``total``-row batch that this process samples (data-parallel
    rollouts, ``trainer.distributed``). Every process draws the random numbers of the whole
    batch at each decode step and keeps its rows', and the loop runs until ``all_done`` says
    every process is done, so a response does not depend on how the batch was split."""

    rows: range
    total: int
    all_done: Callable[[bool], bool] = lambda done: done

    @staticmethod
    def whole(n: int) -> BatchSlice:
        return BatchSlice(range(n), n)


@dataclasses.dataclass(frozen=True)
class PPOStats:
    policy_loss: float
    value_loss: float
    ptx_loss: float  # 0 when no pretraining batch (plain PPO)
    kl: float  # mean per-episode log π_old/π_SFT of the minibatch (nats)
    approx_kl: float  # mean per-token log π_old - log π_new: how far this step moved
    clip_frac: float
    entropy: float  # mean per-token entropy of the policy on the responses
    mean_reward: float  # mean normalised RM reward of the minibatch
    mean_return: float
    grad_norm: float
    episodes: int


def value_model_from_rm(rm: RewardModel) -> RewardModel:
    """A trainable copy of the reward model to serve as the value network."""
    value = copy.deepcopy(rm)
    value.requires_grad_(True)
    return value


def _logprobs(
    model: PreTrainedModel, ids: Tensor, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    with models.autocast(ids.device):
        logits = model(input_ids=ids, attention_mask=mask).logits
    return losses.token_logprobs(logits / temperature if temperature != 1.0 else logits, ids)


def _values(value_model: RewardModel, ids: Tensor, mask: Tensor) -> Tensor:
    with models.autocast(ids.device):
        return value_model.per_token(ids, mask)[:, :-1] + value_model.bias


@torch.no_grad()
def sample(
    policy: PreTrainedModel,
    ids: Tensor,
    mask: Tensor,
    *,
    max_new_tokens: int,
    eos: set[int],
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    part: BatchSlice | None = None,
) -> list[tuple[list[int], bool]]:
    """Samples a response per left-padded prompt from softmax(logits / temperature), exactly.

    Nothing else touches the distribution: no top-k/top-p, and none of the processors a
    model's ``generation_config`` would add to ``generate`` (repetition penalty, suppressed
    tokens, a minimum length...), so PPO's ratio starts from the very distribution the tokens
    were drawn from. Each token is the inverse CDF of one uniform draw, drawn for every row of
    the whole batch (``part``: which rows these are) so the draws do not depend on the split.
    Returns each response's tokens (up to and including the first EOS) and whether it ended
    with EOS (False: cut by ``max_new_tokens``).
    """
    device = policy.device
    part = part or BatchSlice.whole(ids.shape[0])
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    eos_ids = torch.tensor(sorted(eos), device=device)
    mine = torch.tensor(list(part.rows), dtype=torch.long, device=device)
    tokens: list[Tensor] = []
    past = None
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        with models.autocast(device):
            out = policy(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                         past_key_values=past, use_cache=True)  # fmt: skip
        past = out.past_key_values
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
        u = torch.rand(part.total, generator=generator, device=device)[mine]
        cdf = probs.cumsum(dim=-1)
        token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
        token = token.clamp(max=probs.shape[-1] - 1)
        tokens.append(torch.where(done, torch.zeros_like(token), token))
        done = done | torch.isin(token, eos_ids)
        if part.all_done(bool(done.all())):
            break
        step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    rows = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(ids.shape[0])]
    return [_cut_at_eos(row, eos) for row in rows]


def _cut_at_eos(tokens: Sequence[int], eos: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens):
        if t in eos:
            return list(tokens[: i + 1]), True
    return list(tokens), False


def eos_ids(policy: PreTrainedModel, tok: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end a response: the tokenizer's EOS and the model's own."""
    eos = {tok.eos_token_id}
    return eos | set(torch.tensor(policy.generation_config.eos_token_id or []).view(-1).tolist())


@torch.no_grad()
def rollout(
    policy: PreTrainedModel,
    ref_policy: PreTrainedModel,
    value_model: RewardModel,
    reward_model: RewardModel,
    tok: PreTrainedTokenizerBase,
    spec: EncodingSpec,
    prompts: Sequence[Prompt],
    *,
    beta: float,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
    missing_eos_penalty: float = 0.0,
    generator: torch.Generator | None = None,
    part: BatchSlice | None = None,
) -> Rollout:
    """``part``: ``prompts`` are these rows of a larger batch (data-parallel rollouts);
    whitening is then the caller's, over the whole batch (``whiten_rollout``)."""
    device = policy.device
    ids, mask = encoding.encode_prompts(tok, spec, prompts)
    cut = sample(policy, ids, mask, max_new_tokens=max_new_tokens, eos=eos_ids(policy, tok),
                 temperature=temperature, generator=generator, part=part)  # fmt: skip
    prompt_ids = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    batch = encoding.join_pairs(prompt_ids, [c[0] for c in cut], tok.pad_token_id).to(device)
    ids, mask, action_mask = batch.input_ids, batch.attention_mask, batch.response_mask[:, 1:]
    ended = torch.tensor([c[1] for c in cut], device=device)

    # Log-probs of the distribution the tokens were sampled from (the same temperature), for
    # the policy and the reference alike: the KL penalty compares like with like.
    logp = _logprobs(policy, ids, mask, temperature)
    ref_logp = _logprobs(ref_policy, ids, mask, temperature)
    values = _values(value_model, ids, mask) * action_mask
    with models.autocast(device):
        rm_score = reward_model(ids, mask).float()
    # A response cut by the length limit has no EOS, unlike everything the RM learnt from.
    score = rm_score - missing_eos_penalty * (~ended).float()
    rewards = losses.kl_penalized_rewards(score, logp, ref_logp, action_mask, beta)
    advantages, returns = losses.gae(rewards, values, action_mask, gamma, lam)
    if whiten_advantages:
        advantages = losses.whiten(advantages, action_mask)
    return Rollout(
        prompts=list(prompts),
        responses=tok.batch_decode([c[0] for c in cut], skip_special_tokens=True),
        input_ids=ids,
        attention_mask=mask,
        action_mask=action_mask,
        logp=logp,
        ref_logp=ref_logp,
        values=values,
        rm_score=rm_score,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        ended=ended,
    )


def ppo_step(
    policy: PreTrainedModel,
    value_model: RewardModel,
    optimizer: torch.optim.Optimizer,
    batch: Rollout,
    *,
    ptx: tuple[Tensor, Tensor] | None = None,
    gamma_ptx: float = 0.0,
    clip: float = 0.2,
    value_clip: float = 0.2,
    vf_coef: float = 0.5,
    max_grad_norm: float | None = 1.0,
    temperature: float = 1.0,
) -> PPOStats:
    optimizer.zero_grad(set_to_none=True)
    stats = ppo_backward(policy, value_model, batch, ptx=ptx, gamma_ptx=gamma_ptx, clip=clip,
                         value_clip=value_clip, vf_coef=vf_coef, temperature=temperature)  # fmt: skip
    # One optimizer step for both passes.
    return dataclasses.replace(stats, grad_norm=clip_and_step(optimizer, max_grad_norm))


def ppo_backward(
    policy: PreTrainedModel,
    value_model: RewardModel,
    batch: Rollout,
    *,
    ptx: tuple[Tensor, Tensor] | None = None,
    gamma_ptx: float = 0.0,
    clip: float = 0.2,
    value_clip: float = 0.2,
    vf_coef: float = 0.5,
    temperature: float = 1.0,
    weight: float = 1.0,
    ptx_weight: float = 1.0,
) -> PPOStats:
    """The two backward passes of ``ppo_step`` without the step: gradients of ``weight`` x
    the PPO loss and ``ptx_weight`` x the ptx term accumulate (micro-batches, ranks)."""
    device = policy.device
    ids, mask, am = batch.input_ids, batch.attention_mask, batch.action_mask

    # Pass 1: clipped surrogate + clipped value loss on the rollout minibatch.
    with models.autocast(device):
        logits = policy(input_ids=ids, attention_mask=mask).logits
    if temperature != 1.0:
        logits = logits / temperature  # the distribution the rollout sampled from
    logp = losses.token_logprobs(logits, ids)
    with torch.no_grad():
        entropy = losses.masked_mean(losses.entropy_from_logits(logits[:, :-1]), am)
    values = _values(value_model, ids, mask)
    policy_loss, clip_frac = losses.ppo_policy_loss(logp, batch.logp, batch.advantages, am, clip)
    v_loss = losses.value_loss(values, batch.values, batch.returns, am, value_clip)
    (weight * (policy_loss + vf_coef * v_loss)).backward()
    del logits

    # Pass 2: γ · pretraining LM loss, accumulated into the same gradients (PPO-ptx).
    ptx_value = 0.0
    if ptx is not None and gamma_ptx > 0:
        ptx_ids, ptx_mask = (t.to(device) for t in ptx)
        with models.autocast(device):
            ptx_logits = policy(input_ids=ptx_ids, attention_mask=ptx_mask).logits
        ptx_loss = losses.ptx_loss(ptx_logits, ptx_ids, ptx_mask)
        (ptx_weight * gamma_ptx * ptx_loss).backward()
        ptx_value = ptx_loss.item()

    return PPOStats(
        policy_loss=policy_loss.item(),
        value_loss=v_loss.item(),
        ptx_loss=ptx_value,
        kl=float(batch.kl.mean()),
        approx_kl=float(losses.masked_mean(batch.logp - logp.detach(), am)),
        clip_frac=float(clip_frac),
        entropy=float(entropy),
        mean_reward=float(batch.rm_score.mean()),
        mean_return=float(losses.masked_mean(batch.returns, am)),
        grad_norm=0.0,
        episodes=len(batch),
    )


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """One rollout of the ranks' slices, in order; per-token tensors right-padded with zeros
    to the longest (off-mask positions carry nothing: GAE and every loss are masked)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.input_ids.shape[1] for p in parts)
    joined: dict[str, object] = {}
    for f in dataclasses.fields(Rollout):
        values = [getattr(p, f.name) for p in parts]
        if not isinstance(values[0], Tensor):
            joined[f.name] = [item for v in values for item in v]
            continue
        if values[0].dim() == 2:
            # input_ids are padded with zeros too: off the attention mask, never read.
            full = width if values[0].shape[1] == parts[0].input_ids.shape[1] else width - 1
            values = [torch.nn.functional.pad(v, (0, full - v.shape[1])) for v in values]
        joined[f.name] = torch.cat(values)
    return Rollout(**joined)  # type: ignore[arg-type]


def whiten_rollout(ro: Rollout) -> Rollout:
    """Advantages whitened over the whole batch (what ``rollout`` does for one process)."""
    return dataclasses.replace(ro, advantages=losses.whiten(ro.advantages, ro.action_mask))


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float = 0.992) -> None:
    """ema ← decay · ema + (1 - decay) · model, parameter by parameter (shard by shard when
    both are sharded alike; a whole EMA copy takes the gathered parameter)."""
    for e, p in zip(ema_model.parameters(), model.parameters(), strict=True):
        if isinstance(e, DTensor):
            target, source = e.to_local(), p.to_local() if isinstance(p, DTensor) else p
        else:
            target, source = e, p.full_tensor() if isinstance(p, DTensor) else p
        target.lerp_(source.to(target.device, target.dtype), 1.0 - decay)
