"""An RM round: the reward model trained on the pending K-way rankings.

It continues the latest trained RM (the first one starts from the SFT policy's trunk,
``trainer.registry.load_rm``), then sets the bias so demonstrations score 0 on average.
Gate: val pairwise accuracy may drop at most ``gates.rm_accuracy_margin`` below the RM it
continued (the first RM trained from feedback has nothing to beat).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf import checkpoint
from rlhf.models import RewardModel
from trainer import evaluate
from trainer import registry as registry_lib
from trainer import rm as rm_steps
from trainer.data import Comparison, Demonstration
from trainer.distributed import clip_and_step
from trainer.gates import GateResult, rm_gate
from trainer.registry import REWARD
from trainer.round import Candidate, RoundContext, chunks, cosine_schedule, optimizer


def run_rm_round(
    ctx: RoundContext,
    comparisons: Sequence[Comparison],
    *,
    val: Sequence[Comparison],
    test: Sequence[Comparison],
    bias_demos: Sequence[Demonstration],
) -> Candidate:
    cfg, c = ctx.cfg, ctx.cfg.rm
    rm, tok = registry_lib.load_rm(cfg.registry, cfg.base_model, ctx.load_device)
    rm.requires_grad_(True)
    rm = ctx.place(rm, trainable=True)
    with ctx.phase("evaluation"):
        # The first RM trained from feedback has nothing to beat: an initial RM's zero head
        # ties every pair (accuracy 0.5 exactly), which a small val set's noise then "fails".
        first = registry_lib.trained_rm(cfg.registry) is None
        before = None if first else evaluate.rm_accuracy(rm, tok, ctx.spec, val)
    ctx.dist.reshard(rm)  # before the optimizer takes the (sharded) parameters
    steps = c.epochs * math.ceil(len(comparisons) / c.batch_prompts)
    opt = optimizer(rm.parameters(), c.lr, c.adam_betas, c.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, c.lr_final_ratio))
    rng = random.Random(f"{cfg.seed}:rm:{comparisons[0].event_id if comparisons else ''}")
    total = acc = 0.0
    with ctx.phase("training"), ctx.progress(steps, "rm") as bar:
        for _ in range(c.epochs):
            for chunk in chunks(rng.sample(list(comparisons), len(comparisons)), c.batch_prompts):
                ctx.check_stop()
                loss, accuracy = _step(ctx, rm, tok, opt, chunk)
                schedule.step()
                total += loss
                acc += accuracy
                bar.update()
    if c.fit_bias and bias_demos:
        rm_steps.fit_bias(
            rm, tok, ctx.spec, [d.prompt for d in bias_demos], [d.response for d in bias_demos]
        )
    with ctx.phase("evaluation"):
        after = evaluate.rm_accuracy(rm, tok, ctx.spec, val)
        held_out = evaluate.rm_accuracy(rm, tok, ctx.spec, test)
    metrics = {
        "rm_loss": total / max(1, steps),
        "train_accuracy": acc / max(1, steps),
        "examples": float(len(comparisons)),
        "bias": float(rm.bias),
    }
    if after.accuracy is not None:
        metrics["val_accuracy"] = after.accuracy
    if held_out.accuracy is not None:
        metrics["test_accuracy"] = held_out.accuracy
    gate = rm_gate(cfg.gates, after, before) if cfg.gates.enabled else GateResult()
    rm.eval()

    def save(out: Path | None) -> None:
        state = ctx.dist.full_state_dict(rm)
        if out is not None and state is not None:
            rm.save(out, tok, ctx.publish_dtype, state)

    previous = checkpoint.latest(cfg.registry, REWARD)
    reference = registry_lib.reference_dir(cfg.registry, cfg.base_model)
    return Candidate(
        REWARD,
        save,
        metrics,
        gate,
        tuple(x.event_id for x in comparisons),
        "comparisons",
        parent=previous.name if previous else None,
        # The policy lineage it was trained beside (its first version starts from that trunk).
        reference=registry_lib.reference_name(cfg.registry, reference),
    )


def _step(
    ctx: RoundContext, rm: RewardModel, tok: Any, opt: torch.optim.Optimizer,
    chunk: Sequence[Comparison],
) -> tuple[float, float]:  # fmt: skip
    """One optimizer step on a batch of rankings: this rank's micro-batches of prompts, each
    weighted by its share of the prompts that have a pair (the loss averages over those).
    Returns the global loss and pair accuracy."""
    ctx.dist.reshard(rm)
    has_pair = [1.0 if len(set(x.ranks)) > 1 else 0.0 for x in chunk]
    loss = correct = pairs = 0.0
    for rows, weight in ctx.micro_batches(has_pair):
        part = [chunk[i] for i in rows]
        batch = rm_steps.encode_rankings(
            tok, ctx.spec, [x.prompt for x in part], [list(x.responses) for x in part],
            [list(x.ranks) for x in part],
        )  # fmt: skip
        stats = rm_steps.rm_backward(rm, batch, weight=weight)
        loss += weight * stats.loss
        if weight > 0:
            correct += stats.accuracy * stats.pairs
            pairs += stats.pairs
    clip_and_step(opt, 1.0)
    loss, correct, pairs = ctx.dist.sum([loss, correct, pairs])
    return loss / ctx.dist.grad_scale, correct / pairs if pairs else 0.0
