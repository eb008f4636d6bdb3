"""A PPO-ptx round: the latest policy optimised against the latest RM (PAPER.md, step 3).

The round continues its lineage (``trainer.registry``): the KL penalty, the KL gate and the
win rate measure against the lineage's fixed SFT reference, and the trainer state the last
round left beside its checkpoint (raw weights, value network, AdamW, warm-up, β;
``trainer.state``) is where this one starts. Each iteration samples ``ppo.episodes`` prompts
from the train pool, rolls them out (scored by the RM, KL-penalised against the reference),
then takes PPO-ptx steps over minibatches. Gates: val reward may not drop, KL to the
reference stays under the budget, the win rate against the reference reaches its minimum,
the pretraining loss may not regress (``trainer.gates``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf import encoding
from rlhf.encoding import Prompt
from trainer import evaluate, losses, ppo, ppo_models
from trainer import registry as registry_lib
from trainer import state as state_lib
from trainer.config import PPOConfig
from trainer.distributed import clip_and_step
from trainer.gates import GateResult, policy_gate
from trainer.registry import POLICY
from trainer.round import Candidate, RoundContext, prefixed, take

KLController = losses.FixedKLController | losses.AdaptiveKLController
_TRAIN_STATS = (
    "policy_loss",
    "value_loss",
    "ptx_loss",
    "kl",
    "clip_frac",
    "entropy",
    "mean_reward",
)


def kl_controller(c: PPOConfig, beta: float | None = None) -> KLController:
    """β from the config, or carried over (``beta``) when the controller adapts it."""
    if c.adaptive_kl:
        return losses.AdaptiveKLController(beta or c.beta, c.kl_target, c.kl_horizon)
    return losses.FixedKLController(c.beta)


def run_ppo_round(
    ctx: RoundContext,
    pool: Sequence[Prompt],
    *,
    val_prompts: Sequence[Prompt],
    trained_ids: Sequence[str] = (),
) -> Candidate:
    """``pool``: train prompts to roll out on; ``val_prompts``: what the gates evaluate on;
    ``trained_ids``: the new served prompts this round accounts for (published, they leave
    the pending list)."""
    cfg, c, dist = ctx.cfg, ctx.cfg.ppo, ctx.dist
    if c.episodes < dist.world:
        raise ValueError(
            f"ppo.episodes ({c.episodes}) must be at least the world size ({dist.world})"
        )
    start = registry_lib.policy_dir(cfg.registry, cfg.base_model)
    reference_path = registry_lib.reference_of(cfg.registry, start, cfg.base_model)
    in_registry = start.parent == cfg.registry / POLICY
    saved = state_lib.load(cfg.registry, start.name) if in_registry else None
    m = ppo_models.build(ctx, start, reference_path, saved)
    policy, reference, rm, value, tok = m.policy, m.reference, m.rm, m.value, m.tok
    with ctx.phase("evaluation"):
        ref_eval, ref_samples = ctx.policy_eval(
            reference, reference, rm, tok, prompts=val_prompts, demos=[]
        )
        before, _ = ctx.policy_eval(m.previous, reference, rm, tok, prompts=val_prompts, demos=[])
    kl_ctl = kl_controller(c, saved.beta if saved is not None else None)
    warmup = max(1, c.warmup_iters)
    steps_before = m.steps_before
    schedule = torch.optim.lr_scheduler.LambdaLR(
        m.opt, lambda step: min(1.0, (steps_before + step + 1) / warmup)
    )
    rng = random.Random(f"{cfg.seed}:ppo:{ctx.round_index}:{len(pool)}:{steps_before}")
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    sampler = torch.Generator(ctx.device).manual_seed(rng.randrange(2**31))
    steps_per_iter = c.inner_epochs * math.ceil(c.episodes / c.minibatch_size)
    sums = dict.fromkeys(_TRAIN_STATS, 0.0)
    n_steps = 0
    rows = dist.rows(c.episodes)
    part = ppo.BatchSlice(rows, c.episodes, dist.all_done)
    with ctx.progress(c.iterations * steps_per_iter, "ppo") as bar:
        for _ in range(c.iterations):
            ctx.check_stop()
            prompts = [rng.choice(pool) for _ in range(c.episodes)]
            with ctx.phase("generation"):
                mine = ppo.rollout(policy, reference, value, rm, tok, ctx.spec, [prompts[i] for i in rows],
                                   beta=kl_ctl.value, max_new_tokens=c.max_new_tokens,
                                   temperature=c.temperature, gamma=c.gae_gamma, lam=c.gae_lambda,
                                   missing_eos_penalty=c.missing_eos_penalty, generator=sampler,
                                   whiten_advantages=False, part=part)  # fmt: skip
                # Every rank's episodes, advantages whitened over all of them.
                parts = [p.to(mine.input_ids.device) for p in dist.gather(mine.to("cpu"))]
                ro = ppo.whiten_rollout(ppo.concat_rollouts(parts))
            with ctx.phase("training"):
                for _ in range(c.inner_epochs):
                    for mb in ro.minibatches(c.minibatch_size, generator):
                        ctx.check_stop()
                        ptx = None
                        if c.gamma_ptx > 0 and c.ptx_ratio > 0:
                            texts = ctx.corpus.sample(c.ptx_ratio * len(mb), rng)
                            ptx = encoding.encode_texts(tok, texts, c.ptx_seq_len)
                        for name, v in _step(ctx, m, mb, ptx).items():
                            sums[name] += v
                        schedule.step()
                        if m.ema is not None:
                            ppo.ema_update(m.ema, policy, c.ema_decay)
                        n_steps += 1
                        bar.update()
            kl_ctl.update(float(ro.kl.mean()), len(ro))
    published = m.published
    published.eval()
    with ctx.phase("evaluation"):
        after, samples = ctx.policy_eval(
            published, reference, rm, tok, prompts=val_prompts, demos=[]
        )
    if samples is not None and ref_samples is not None:
        after = dataclasses.replace(
            after, win=evaluate.win_rate(samples.rewards, ref_samples.rewards)
        )
    metrics = {f"train_{k}": v / max(1, n_steps) for k, v in sums.items()}
    metrics |= prefixed("val_", after)
    if ref_eval.mean_reward is not None:
        metrics["reference_mean_reward"] = ref_eval.mean_reward
    metrics["beta"] = float(kl_ctl.value)
    metrics["episodes"] = float(c.iterations * c.episodes)
    metrics["lineage_steps"] = float(steps_before + n_steps)
    gate = policy_gate(cfg.gates, "ppo", after, before) if cfg.gates.enabled else GateResult()
    reference_name = registry_lib.reference_name(cfg.registry, reference_path)

    def save(out: Path | None) -> None:
        ppo_models.save_published(ctx, m, out)

    def save_state(out: Path | None) -> None:
        ppo_models.save_state(ctx, m, out, reference=reference_name, beta=kl_ctl.value,
                              steps=steps_before + n_steps)  # fmt: skip

    return Candidate(
        POLICY,
        save,
        metrics,
        gate,
        tuple(trained_ids),
        "prompts",
        parent=start.name if in_registry else None,
        reference=reference_name,
        save_state=save_state,
    )


def _step(
    ctx: RoundContext, m: ppo_models.PPOModels, mb: ppo.Rollout,
    ptx: tuple[torch.Tensor, torch.Tensor] | None,
) -> dict[str, float]:  # fmt: skip
    """One optimizer step on a minibatch: this rank's micro-batches, each weighted by its
    share of the minibatch's response tokens (and of the ptx tokens). Returns the step's
    statistics over the whole minibatch."""
    c, dist = ctx.cfg.ppo, ctx.dist
    dist.reshard(m.policy, m.value)
    parts = ctx.micro_batches(mb.action_mask.sum(dim=1).tolist())
    ptx_parts = ctx.micro_batches(ptx[1][:, 1:].sum(dim=1).tolist()) if ptx is not None else None
    token_stats = dict.fromkeys(
        ("policy_loss", "value_loss", "clip_frac", "entropy", "ptx_loss"), 0.0
    )
    for i, (rows, weight) in enumerate(parts):
        mb_ptx, ptx_weight = None, 0.0
        if ptx is not None and ptx_parts is not None:
            ptx_rows, ptx_weight = ptx_parts[i]
            mb_ptx = take(ptx, ptx_rows)
        stats = ppo.ppo_backward(m.policy, m.value, mb.select(torch.tensor(rows)), ptx=mb_ptx,
                                 gamma_ptx=c.gamma_ptx, clip=c.clip, value_clip=c.value_clip,
                                 vf_coef=c.vf_coef, temperature=c.temperature, weight=weight,
                                 ptx_weight=ptx_weight)  # fmt: skip
        for name in token_stats:
            token_stats[name] += (ptx_weight if name == "ptx_loss" else weight) * getattr(
                stats, name
            )
    clip_and_step(m.opt, 1.0)
    totals = dist.sum(list(token_stats.values()))
    out = {name: v / dist.grad_scale for name, v in zip(token_stats, totals, strict=True)}
    # Episode statistics: every rank holds the whole minibatch.
    out["kl"] = float(mb.kl.mean())
    out["mean_reward"] = float(mb.rm_score.mean())
    return out
