"""A PPO-ptx round: the latest policy optimised against the latest RM (PAPER.md, step 3).

Each iteration samples ``ppo.episodes`` prompts from the train pool, rolls them out (scored
by the RM, KL-penalised against the reference policy), then takes PPO-ptx steps over
minibatches. Gates: val reward may not drop, KL to the reference stays under the budget,
the pretraining loss may not regress (``trainer.gates``).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf import models
from trainer import losses, ppo
from trainer import registry as registry_lib
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


def run_ppo_round(
    ctx: RoundContext, pool: Sequence[str], *, val_prompts: Sequence[str], kl_ctl: KLController
) -> Candidate:
    """``pool``: train prompts to roll out on; ``kl_ctl`` is updated after every iteration."""
    cfg, c = ctx.cfg, ctx.cfg.ppo
    policy, tok = models.load_policy(
        registry_lib.policy_dir(cfg.registry, cfg.base_model), ctx.device
    )
    reference, _ = models.load_policy(
        registry_lib.reference_dir(cfg.registry, cfg.base_model), ctx.device
    )
    rm, _ = registry_lib.load_rm(cfg.registry, cfg.base_model, ctx.device)
    reference.requires_grad_(False)
    rm.requires_grad_(False)
    with ctx.phase("evaluation"):
        before = ctx.policy_eval(policy, reference, rm, tok, prompts=val_prompts, demos=[])
    value = ppo.value_model_from_rm(rm)
    ema = copy.deepcopy(policy) if c.ema_decay > 0 else None
    opt = optimizer([*policy.parameters(), *value.parameters()], c.lr, c.adam_betas)
    warmup = max(1, c.warmup_iters)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    rng = random.Random(f"{cfg.seed}:ppo:{ctx.round_index}:{len(pool)}")
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    steps_per_iter = c.inner_epochs * math.ceil(c.episodes / c.minibatch_size)
    sums = dict.fromkeys(_TRAIN_STATS, 0.0)
    n_steps = 0
    with ctx.progress(c.iterations * steps_per_iter, "ppo") as bar:
        for _ in range(c.iterations):
            ctx.check_stop()
            prompts = [rng.choice(pool) for _ in range(c.episodes)]
            with ctx.phase("generation"):
                ro = ppo.rollout(policy, reference, value, rm, tok, prompts, beta=kl_ctl.value,
                                 max_new_tokens=c.max_new_tokens, max_prompt_tokens=c.max_prompt_len,
                                 temperature=c.temperature, gamma=c.gae_gamma, lam=c.gae_lambda)  # fmt: skip
            with ctx.phase("training"):
                for _ in range(c.inner_epochs):
                    for mb in ro.minibatches(c.minibatch_size, generator):
                        ctx.check_stop()
                        ptx = None
                        if c.gamma_ptx > 0 and c.ptx_ratio > 0:
                            texts = ctx.corpus.sample(c.ptx_ratio * len(mb), rng)
                            ptx = models.encode_texts(tok, texts, c.ptx_seq_len)
                        stats = ppo.ppo_step(policy, value, opt, mb, ptx=ptx, gamma_ptx=c.gamma_ptx,
                                             clip=c.clip, value_clip=c.value_clip, vf_coef=c.vf_coef)  # fmt: skip
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
        after = ctx.policy_eval(published, reference, rm, tok, prompts=val_prompts, demos=[])
    metrics = {f"train_{k}": v / max(1, n_steps) for k, v in sums.items()}
    metrics |= prefixed("val_", after)
    metrics["beta"] = float(kl_ctl.value)
    metrics["episodes"] = float(c.iterations * c.episodes)
    gate = policy_gate(cfg.gates, "ppo", after, before) if cfg.gates.enabled else GateResult()

    def save(out: Path) -> None:
        published.save_pretrained(out)
        tok.save_pretrained(out)

    return Candidate(POLICY, save, metrics, gate, (), "prompts")
