"""Step 1 of InstructGPT: supervised fine-tuning on demonstrations.

    sft_step(policy, optimizer, batch, *, ptx=None, ptx_coef=0.0, max_grad_norm=1.0) -> SFTStats
        One optimizer step of response-token cross-entropy on `batch` (a PairBatch from
        `rlhf.encoding.encode_pairs(tok, spec, prompts, responses)`), plus `ptx_coef` times the
        LM loss on `ptx` = (input_ids, attention_mask) from `encoding.encode_texts` when given.
    sft_backward(policy, batch, *, ptx=None, ptx_coef=0.0, weight=1.0, ptx_weight=1.0)
        Its forward and backward passes alone: weighted gradients accumulate (micro-batches,
        ranks); `trainer.distributed.clip_and_step` then takes the step.
    sft_eval(policy, batch) -> float     mean response-token CE, no gradient

The optimizer is the caller's (the paper: Adam β=(0.9, 0.95), cosine decay to 10%; step the
scheduler after each call). On CUDA the forward runs under bf16 autocast over the fp32
master weights the optimizer updates.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from transformers import PreTrainedModel

from rlhf import models
from rlhf.encoding import PairBatch
from trainer import losses
from trainer.distributed import clip_and_step


@dataclasses.dataclass(frozen=True)
class SFTStats:
    loss: float  # response-token cross-entropy (nats/token)
    ptx_loss: float  # pretraining LM loss (0 when no ptx batch)
    tokens: int  # response tokens trained on
    grad_norm: float


def sft_step(
    policy: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: PairBatch,
    *,
    ptx: tuple[Tensor, Tensor] | None = None,
    ptx_coef: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> SFTStats:
    optimizer.zero_grad(set_to_none=True)
    stats = sft_backward(policy, batch, ptx=ptx, ptx_coef=ptx_coef)
    return dataclasses.replace(stats, grad_norm=clip_and_step(optimizer, max_grad_norm))


def sft_backward(
    policy: PreTrainedModel,
    batch: PairBatch,
    *,
    ptx: tuple[Tensor, Tensor] | None = None,
    ptx_coef: float = 0.0,
    weight: float = 1.0,
    ptx_weight: float = 1.0,
) -> SFTStats:
    """The forward and backward passes of ``sft_step`` without the optimizer step: gradients
    of ``weight`` x the batch loss (and ``ptx_weight`` x the ptx term) accumulate, so several
    micro-batches (or ranks) weighted by their share make up one step."""
    device = policy.device
    batch = batch.to(device)
    policy.train()
    with models.autocast(device):
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = losses.sft_loss(logits, batch.input_ids, batch.response_mask)
    (weight * loss).backward()
    del logits
    ptx_value = 0.0
    if ptx is not None and ptx_coef > 0:
        ids, mask = (t.to(device) for t in ptx)
        with models.autocast(device):
            ptx_logits = policy(input_ids=ids, attention_mask=mask).logits
            ptx_loss = losses.ptx_loss(ptx_logits, ids, mask)
        (ptx_weight * ptx_coef * ptx_loss).backward()  # accumulates into the same step
        ptx_value = ptx_loss.item()
    policy.eval()
    return SFTStats(
        loss=loss.item(),
        ptx_loss=ptx_value,
        tokens=int(batch.response_mask[:, 1:].sum()),
        grad_norm=0.0,
    )


@torch.no_grad()
def sft_eval(policy: PreTrainedModel, batch: PairBatch) -> float:
    """Mean response-token cross-entropy of `policy` on `batch` (validation demonstrations)."""
    batch = batch.to(policy.device)
    with models.autocast(policy.device):
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return float(losses.sft_loss(logits, batch.input_ids, batch.response_mask))
