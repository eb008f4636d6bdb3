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

import copy
import dataclasses
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf import encoding, models
from rlhf.encoding import Prompt
from trainer import evaluate, losses, ppo
from trainer import registry as registry_lib
from trainer import state as state_lib
from trainer.config import PPOConfig
from trainer.gates import GateResult, policy_gate
from trainer.registry import POLICY
from trainer.round import Candidate, RoundContext, optimizer, prefixed

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
    cfg, c = ctx.cfg, ctx.cfg.ppo
    start = registry_lib.policy_dir(cfg.registry, cfg.base_model)
    reference_path = registry_lib.reference_of(cfg.registry, start, cfg.base_model)
    in_registry = start.parent == cfg.registry / POLICY
    saved = state_lib.load(cfg.registry, start.name) if in_registry else None
    # The published weights are the EMA when one is kept; training continues the raw ones.
    raw = saved.raw_policy if saved is not None and saved.raw_policy is not None else start
    policy, tok = registry_lib.load_policy(raw, ctx.device)
    reference, _ = registry_lib.load_policy(reference_path, ctx.device)
    rm, _ = registry_lib.load_rm(cfg.registry, cfg.base_model, ctx.device)
    reference.requires_grad_(False)
    rm.requires_grad_(False)
    # The version published last: what the gates compare with (the EMA, when one is kept).
    previous = policy if raw == start else registry_lib.load_policy(start, ctx.device)[0]
    with ctx.phase("evaluation"):
        ref_eval, ref_samples = ctx.policy_eval(
            reference, reference, rm, tok, prompts=val_prompts, demos=[]
        )
        before, _ = ctx.policy_eval(previous, reference, rm, tok, prompts=val_prompts, demos=[])
    ema = None
    if c.ema_decay > 0:
        ema = previous if previous is not policy else copy.deepcopy(policy)
    if saved is not None:
        value = models.load_reward_model(saved.value, ctx.device, registry_lib.MASTER)[0]
        value.requires_grad_(True)
    else:
        value = ppo.value_model_from_rm(rm)
    opt = optimizer([*policy.parameters(), *value.parameters()], c.lr, c.adam_betas)
    steps_before = 0
    if saved is not None:
        opt.load_state_dict(torch.load(saved.optimizer, map_location=ctx.device))
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = c.lr  # the configured LR, not the saved one
        steps_before = saved.steps
    kl_ctl = kl_controller(c, saved.beta if saved is not None else None)
    warmup = max(1, c.warmup_iters)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (steps_before + step + 1) / warmup)
    )
    rng = random.Random(f"{cfg.seed}:ppo:{ctx.round_index}:{len(pool)}:{steps_before}")
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    sampler = torch.Generator(ctx.device).manual_seed(rng.randrange(2**31))
    steps_per_iter = c.inner_epochs * math.ceil(c.episodes / c.minibatch_size)
    sums = dict.fromkeys(_TRAIN_STATS, 0.0)
    n_steps = 0
    with ctx.progress(c.iterations * steps_per_iter, "ppo") as bar:
        for _ in range(c.iterations):
            ctx.check_stop()
            prompts = [rng.choice(pool) for _ in range(c.episodes)]
            with ctx.phase("generation"):
                ro = ppo.rollout(policy, reference, value, rm, tok, ctx.spec, prompts, beta=kl_ctl.value,
                                 max_new_tokens=c.max_new_tokens,
                                 temperature=c.temperature, gamma=c.gae_gamma, lam=c.gae_lambda,
                                 missing_eos_penalty=c.missing_eos_penalty, generator=sampler)  # fmt: skip
            with ctx.phase("training"):
                for _ in range(c.inner_epochs):
                    for mb in ro.minibatches(c.minibatch_size, generator):
                        ctx.check_stop()
                        ptx = None
                        if c.gamma_ptx > 0 and c.ptx_ratio > 0:
                            texts = ctx.corpus.sample(c.ptx_ratio * len(mb), rng)
                            ptx = encoding.encode_texts(tok, texts, c.ptx_seq_len)
                        stats = ppo.ppo_step(policy, value, opt, mb, ptx=ptx, gamma_ptx=c.gamma_ptx,
                                             clip=c.clip, value_clip=c.value_clip, vf_coef=c.vf_coef,
                                             temperature=c.temperature)  # fmt: skip
                        schedule.step()
                        if ema is not None:
                            ppo.ema_update(ema, policy, c.ema_decay)
                        for name in _TRAIN_STATS:
                            sums[name] += getattr(stats, name)
                        n_steps += 1
                        bar.update()
            kl_ctl.update(float(ro.kl.mean()), len(ro))
    published = ema if ema is not None else policy
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

    def save(out: Path) -> None:
        models.save_policy(published, tok, out, ctx.publish_dtype)

    def save_state(out: Path) -> None:
        # Trainer state stays fp32: the next round continues these exact master weights.
        if ema is not None:
            models.save_policy(policy, tok, out / state_lib.POLICY_DIR)
        value.save(out / state_lib.VALUE_DIR, tok)
        torch.save(opt.state_dict(), out / state_lib.OPTIMIZER_FILE)
        state_lib.write_info(
            out, reference=reference_name, beta=kl_ctl.value, steps=steps_before + n_steps
        )

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
