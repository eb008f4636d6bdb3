"""Step 1 of InstructGPT: supervised fine-tuning on demonstrations.

    sft_step(policy, optimizer, batch, *, ptx=None, ptx_coef=0.0, max_grad_norm=1.0) -> SFTStats
        One optimizer step of response-token cross-entropy on `batch` (a PairBatch from
        `rlhf.encoding.encode_pairs(tok, spec, prompts, responses)`), plus `ptx_coef` times the
        LM loss on `ptx` = (input_ids, attention_mask) from `encoding.encode_texts` when given.
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


@dataclasses.dataclass(frozen=True)
class SFTStats:
    loss: float  # response-token cross-entropy (nats/token)
    ptx_loss: float  # pretraining LM loss (0 when no ptx batch)
    tokens: int  # response tokens trained on
    grad_norm: float


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def sft_step(
    policy: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: PairBatch,
    *,
    ptx: tuple[Tensor, Tensor] | None = None,
    ptx_coef: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> SFTStats:
    device = policy.device
    batch = batch.to(device)
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    with models.autocast(device):
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = losses.sft_loss(logits, batch.input_ids, batch.response_mask)
    loss.backward()
    ptx_value = 0.0
    if ptx is not None and ptx_coef > 0:
        ids, mask = (t.to(device) for t in ptx)
        with models.autocast(device):
            ptx_logits = policy(input_ids=ids, attention_mask=mask).logits
            ptx_loss = losses.ptx_loss(ptx_logits, ids, mask)
        (ptx_coef * ptx_loss).backward()  # accumulates into the same step
        ptx_value = ptx_loss.item()
    grad_norm = (
        torch.nn.utils.clip_grad_norm_(_params(optimizer), max_grad_norm)
        if max_grad_norm
        else torch.tensor(0.0)
    )
    optimizer.step()
    policy.eval()
    return SFTStats(
        loss=loss.item(),
        ptx_loss=ptx_value,
        tokens=int(batch.response_mask[:, 1:].sum()),
        grad_norm=float(grad_norm),
    )


@torch.no_grad()
def sft_eval(policy: PreTrainedModel, batch: PairBatch) -> float:
    """Mean response-token cross-entropy of `policy` on `batch` (validation demonstrations)."""
    batch = batch.to(policy.device)
    with models.autocast(policy.device):
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return float(losses.sft_loss(logits, batch.input_ids, batch.response_mask))
