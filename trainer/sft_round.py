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

import torch

from rlhf import encoding, models
from trainer import registry as registry_lib
from trainer import sft as sft_steps
from trainer.data import Demonstration
from trainer.gates import GateResult, policy_gate
from trainer.registry import POLICY
from trainer.round import Candidate, RoundContext, chunks, cosine_schedule, optimizer, prefixed


def run_sft_round(
    ctx: RoundContext, demos: Sequence[Demonstration], val_demos: Sequence[Demonstration]
) -> Candidate:
    cfg, c = ctx.cfg, ctx.cfg.sft
    start = registry_lib.reference_dir(cfg.registry, cfg.base_model)
    policy, tok = registry_lib.load_policy(start, ctx.device)
    with ctx.phase("evaluation"):
        before, _ = ctx.policy_eval(policy, policy, None, tok, prompts=[], demos=val_demos)
    steps = c.epochs * math.ceil(len(demos) / c.batch_size)
    opt = optimizer(policy.parameters(), c.lr, c.adam_betas, c.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, c.lr_final_ratio))
    rng = random.Random(f"{cfg.seed}:sft:{demos[0].event_id if demos else ''}")
    total = 0.0
    with ctx.phase("training"), ctx.progress(steps, "sft") as bar:
        for _ in range(c.epochs):
            for chunk in chunks(rng.sample(list(demos), len(demos)), c.batch_size):
                ctx.check_stop()
                batch = encoding.encode_pairs(
                    tok, ctx.spec, [d.prompt for d in chunk], [d.response for d in chunk]
                )
                ptx = None
                if c.ptx_coef > 0:
                    texts = ctx.corpus.sample(len(chunk), rng)
                    ptx = encoding.encode_texts(tok, texts, cfg.ppo.ptx_seq_len)
                stats = sft_steps.sft_step(policy, opt, batch, ptx=ptx, ptx_coef=c.ptx_coef)
                schedule.step()
                total += stats.loss
                bar.update()
    with ctx.phase("evaluation"):
        after, _ = ctx.policy_eval(policy, policy, None, tok, prompts=[], demos=val_demos)
    metrics = {"sft_loss": total / max(1, steps), "examples": float(len(demos))}
    metrics |= prefixed("val_", after)
    gate = policy_gate(cfg.gates, "sft", after, before) if cfg.gates.enabled else GateResult()

    def save(out: Path) -> None:
        models.save_policy(policy, tok, out, ctx.publish_dtype)

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
