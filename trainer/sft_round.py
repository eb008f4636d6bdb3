"""An SFT round: the latest SFT model fine-tuned on the pending train demonstrations.

It continues the latest lineage's reference (the SFT or initial policy), never a PPO-ptx
output, and its output starts a new lineage: it is its own KL reference, and PPO-ptx rounds
continue from it (``trainer.registry``). Gate: val demonstration loss and the pretraining
loss may not regress against the model it started from (``trainer.gates``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf import encoding, models
from trainer import lora
from trainer import registry as registry_lib
from trainer import sft as sft_steps
from trainer.data import Demonstration
from trainer.distributed import clip_and_step
from trainer.gates import GateResult, policy_gate
from trainer.registry import POLICY
from trainer.round import (
    Candidate,
    RoundContext,
    chunks,
    cosine_schedule,
    optimizer,
    prefixed,
    take,
)


def run_sft_round(
    ctx: RoundContext, demos: Sequence[Demonstration], val_demos: Sequence[Demonstration]
) -> Candidate:
    cfg, c = ctx.cfg, ctx.cfg.sft
    start = registry_lib.reference_dir(cfg.registry, cfg.base_model)
    use_lora = cfg.lora.enabled
    policy, tok = registry_lib.load_policy(start, ctx.load_device)
    if use_lora:
        policy = lora.add_adapters(
            policy, cfg.lora, cfg.seed
        )  # B = 0: it starts as `start` exactly
    policy = ctx.place(policy, trainable=True)
    with ctx.phase("evaluation"):
        before, _ = ctx.policy_eval(policy, policy, None, tok, prompts=[], demos=val_demos)
    steps = c.epochs * math.ceil(len(demos) / c.batch_size)
    opt = optimizer(
        [p for p in policy.parameters() if p.requires_grad], c.lr, c.adam_betas, c.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, c.lr_final_ratio))
    rng = random.Random(f"{cfg.seed}:sft:{demos[0].event_id if demos else ''}")
    total = 0.0
    with ctx.phase("training"), ctx.progress(steps, "sft") as bar:
        for _ in range(c.epochs):
            for chunk in chunks(rng.sample(list(demos), len(demos)), c.batch_size):
                ctx.check_stop()
                # The whole batch is encoded on every rank; each trains on its share of rows.
                batch = encoding.encode_pairs(
                    tok, ctx.spec, [d.prompt for d in chunk], [d.response for d in chunk]
                )
                ptx = None
                if c.ptx_coef > 0:
                    texts = ctx.corpus.sample(len(chunk), rng)
                    ptx = encoding.encode_texts(tok, texts, cfg.ppo.ptx_seq_len)
                total += _step(ctx, policy, opt, batch, ptx)
                schedule.step()
                bar.update()
    with ctx.phase("evaluation"):
        after, _ = ctx.policy_eval(policy, policy, None, tok, prompts=[], demos=val_demos)
    metrics = {"sft_loss": total / max(1, steps), "examples": float(len(demos))}
    metrics |= prefixed("val_", after)
    gate = policy_gate(cfg.gates, "sft", after, before) if cfg.gates.enabled else GateResult()

    def save(out: Path | None) -> None:
        state = ctx.dist.full_state_dict(policy)
        if out is None or state is None:
            return
        if use_lora:
            state = lora.merged_state(state, cfg.lora)
        models.save_policy(lora.base_model(policy), tok, out, ctx.publish_dtype, state)

    in_registry = start.parent == cfg.registry / POLICY
    return Candidate(
        POLICY,
        save,
        metrics,
        gate,
        tuple(d.event_id for d in demos),
        "demonstrations",
        parent=start.name if in_registry else None,
        reference=None,  # a new lineage: its own reference
    )


def _step(
    ctx: RoundContext,
    policy: Any,
    opt: torch.optim.Optimizer,
    batch: encoding.PairBatch,
    ptx: tuple[torch.Tensor, torch.Tensor] | None,
) -> float:
    """One optimizer step on a global batch: this rank's micro-batches, each weighted by its
    share of the batch's response tokens (and of the ptx tokens). Returns the global loss."""
    c = ctx.cfg.sft
    ctx.dist.reshard(policy)
    tokens = batch.response_mask[:, 1:].sum(dim=1).tolist()
    parts = ctx.micro_batches(tokens)
    ptx_parts = ctx.micro_batches(ptx[1][:, 1:].sum(dim=1).tolist()) if ptx is not None else None
    loss = 0.0
    for i, (rows, weight) in enumerate(parts):
        mb_ptx, ptx_weight = None, 0.0
        if ptx is not None and ptx_parts is not None:
            ptx_rows, ptx_weight = ptx_parts[i]
            mb_ptx = take(ptx, ptx_rows)
        stats = sft_steps.sft_backward(policy, take(batch, rows), ptx=mb_ptx, ptx_coef=c.ptx_coef,
                                       weight=weight, ptx_weight=ptx_weight)  # fmt: skip
        loss += weight * stats.loss
    clip_and_step(opt, 1.0)
    return ctx.dist.sum([loss])[0] / ctx.dist.grad_scale
