"""Step 2 of InstructGPT: the reward model, trained on K-way rankings.

encode_rankings(tok, spec, prompts, responses, ranks) -> RankBatch
    prompts: B prompts (text or conversations); responses[b]: K_b strings (2..9); ranks[b]:
    K_b ints, 1 is best, equal ranks are ties. Every response appears once in the batch
    (PAPER.md), encoded by `rlhf.encoding` under `spec` (as the reward server scores it).
rm_step(rm, optimizer, batch, *, max_grad_norm=1.0) -> RMStats
    One optimizer step of the K-way ranking loss over the B prompts of `batch`.
rm_backward(rm, batch, *, weight=1.0) -> RMStats
    Its forward and backward passes alone (weighted gradients accumulate; no step).
rm_eval(rm, batch) -> RMStats                  loss and pairwise accuracy, no gradient
fit_bias(rm, tok, spec, prompts, responses, *, batch_size=32) -> float
    After training: bias = -mean(raw reward of demonstrations), so they average 0.
    Returns the new bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from rlhf import encoding, models
from rlhf.encoding import EncodingSpec, Prompt
from rlhf.models import RewardModel
from trainer import losses
from trainer.distributed import clip_and_step


@dataclasses.dataclass(frozen=True)
class RankBatch:
    """N = sum K_b responses, right-padded, and where each sits in the (B, K) grid."""

    input_ids: Tensor  # (N, T)
    attention_mask: Tensor  # (N, T)
    slot: Tensor  # (N,) index into the flattened (B, K) grid
    ranks: Tensor  # (B, K) 1 is best; padded slots 0
    mask: Tensor  # (B, K) 1 on real responses

    def to(self, device: str | torch.device) -> RankBatch:
        return RankBatch(*(t.to(device) for t in dataclasses.astuple(self)))


@dataclasses.dataclass(frozen=True)
class RMStats:
    loss: float
    accuracy: float  # over untied pairs; ties in reward count half
    pairs: int
    prompts: int
    mean_reward: float  # mean normalised reward of the batch's responses
    grad_norm: float  # 0 for rm_eval


def encode_rankings(
    tok: PreTrainedTokenizerBase,
    spec: EncodingSpec,
    prompts: Sequence[Prompt],
    responses: Sequence[Sequence[str]],
    ranks: Sequence[Sequence[int]],
) -> RankBatch:
    if not len(prompts) == len(responses) == len(ranks):
        raise ValueError("prompts, responses and ranks must have the same length")
    k = max(len(r) for r in responses)
    flat_prompts: list[Prompt] = []
    flat_responses: list[str] = []
    slots: list[int] = []
    rank_grid = torch.zeros(len(prompts), k, dtype=torch.long)
    for b, (prompt, resp, rank) in enumerate(zip(prompts, responses, ranks, strict=True)):
        if len(resp) != len(rank):
            raise ValueError(f"prompt {b}: {len(resp)} responses but {len(rank)} ranks")
        rank_grid[b, : len(rank)] = torch.tensor(list(rank), dtype=torch.long)
        flat_prompts += [prompt] * len(resp)
        flat_responses += list(resp)
        slots += [b * k + i for i in range(len(resp))]
    pairs = encoding.encode_pairs(tok, spec, flat_prompts, flat_responses)
    mask = torch.zeros(len(prompts) * k, dtype=torch.long)
    mask[slots] = 1
    return RankBatch(
        pairs.input_ids,
        pairs.attention_mask,
        torch.tensor(slots, dtype=torch.long),
        rank_grid,
        mask.view(len(prompts), k),
    )


def _grid_rewards(rm: RewardModel, batch: RankBatch) -> Tensor:
    """Each response forwarded once, then placed in its prompt's row: (B, K)."""
    with models.autocast(batch.input_ids.device):
        flat = rm(batch.input_ids, batch.attention_mask)
    grid = flat.new_zeros(batch.mask.numel()).index_copy(0, batch.slot, flat)
    return grid.view(batch.mask.shape)


def _stats(rewards: Tensor, batch: RankBatch, loss: Tensor, grad_norm: float) -> RMStats:
    correct, pairs = losses.rm_pair_accuracy(rewards, batch.ranks, batch.mask)
    return RMStats(
        loss=loss.item(),
        accuracy=correct / pairs if pairs else 0.0,
        pairs=int(pairs),
        prompts=int(batch.mask.shape[0]),
        mean_reward=float(losses.masked_mean(rewards.detach(), batch.mask)),
        grad_norm=grad_norm,
    )


def rm_step(
    rm: RewardModel,
    optimizer: torch.optim.Optimizer,
    batch: RankBatch,
    *,
    max_grad_norm: float | None = 1.0,
) -> RMStats:
    optimizer.zero_grad(set_to_none=True)
    stats = rm_backward(rm, batch)
    return dataclasses.replace(stats, grad_norm=clip_and_step(optimizer, max_grad_norm))


def rm_backward(rm: RewardModel, batch: RankBatch, *, weight: float = 1.0) -> RMStats:
    """The forward and backward passes of ``rm_step``: gradients of ``weight`` x the loss
    accumulate (micro-batches, ranks) until ``clip_and_step``."""
    batch = batch.to(rm.head.weight.device)
    rm.train()
    rewards = _grid_rewards(rm, batch)
    loss = losses.rm_ranking_loss(rewards, batch.ranks, batch.mask)
    (weight * loss).backward()
    rm.eval()
    return _stats(rewards, batch, loss, 0.0)


@torch.no_grad()
def rm_eval(rm: RewardModel, batch: RankBatch) -> RMStats:
    batch = batch.to(rm.head.weight.device)
    rewards = _grid_rewards(rm, batch)
    return _stats(rewards, batch, losses.rm_ranking_loss(rewards, batch.ranks, batch.mask), 0.0)


@torch.no_grad()
def fit_bias(
    rm: RewardModel,
    tok: PreTrainedTokenizerBase,
    spec: EncodingSpec,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    *,
    batch_size: int = 32,
) -> float:
    """Sets rm.bias so the demonstrations' normalised rewards average 0 (PAPER.md)."""
    if not prompts:
        return float(rm.bias)
    device = rm.head.weight.device
    raw = []
    for i in range(0, len(prompts), batch_size):
        batch = encoding.encode_pairs(
            tok, spec, prompts[i : i + batch_size], responses[i : i + batch_size]
        ).to(device)
        with models.autocast(device):
            raw.append(rm.raw(batch.input_ids, batch.attention_mask).float())
    rm.bias.fill_(-float(torch.cat(raw).mean()))
    return float(rm.bias)
