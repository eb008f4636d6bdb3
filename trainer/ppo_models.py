"""The models of a PPO-ptx round, built for this process (whole or sharded, with or without
LoRA), and the trainer state they are saved to and restored from (``trainer.state``).

Full fine-tuning: policy (raw weights), value network, frozen reference and RM, and the EMA
copy that is published (``ppo.ema_decay``). LoRA (``trainer.lora``): the policy is the
lineage's reference with adapters and the reference is that model with its adapters off;
the value network is an RM copy with adapters and a trainable head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from rlhf import models
from rlhf.models import RewardModel
from trainer import lora, ppo
from trainer import registry as registry_lib
from trainer import state as state_lib
from trainer.round import RoundContext, optimizer
from trainer.state import SavedState

log = logging.getLogger(__name__)


@dataclass
class PPOModels:
    policy: Any  # trained (raw weights, or the reference with adapters)
    reference: Any  # frozen: the lineage's SFT policy (the policy's base with LoRA)
    rm: RewardModel  # frozen
    value: RewardModel  # trained
    previous: Any  # what the last round published (the gates compare with it)
    ema: Any | None  # published instead of the raw weights, when kept
    tok: Any
    opt: torch.optim.Optimizer
    steps_before: int  # optimizer steps taken earlier in this lineage
    use_lora: bool
    rm_id: str  # which RM the value network was initialised from

    @property
    def trained(self) -> nn.ModuleDict:
        """The modules the optimizer's parameters belong to (named as in its saved state)."""
        return nn.ModuleDict({"policy": self.policy, "value": self.value})

    @property
    def published(self) -> Any:
        return self.ema if self.ema is not None else self.policy


def rm_identity(cfg: Any) -> str:
    """Which reward model a round scores with (the value network's base under LoRA)."""
    trained = registry_lib.trained_rm(cfg.registry)
    if trained is not None:
        return str(trained)
    return "initial:" + str(registry_lib.reference_dir(cfg.registry, cfg.base_model))


def build(
    ctx: RoundContext, start: Path, reference_path: Path, saved: SavedState | None
) -> PPOModels:
    cfg, c = ctx.cfg, ctx.cfg.ppo
    rm_id = rm_identity(cfg)
    rm, tok = registry_lib.load_rm(cfg.registry, cfg.base_model, ctx.load_device)
    rm.requires_grad_(False)
    use_lora = cfg.lora.enabled
    continues = saved is not None and saved.lora == use_lora
    if use_lora:
        adapters_saved = continues and saved is not None
        base = reference_path if adapters_saved or start == reference_path else start
        policy, tok = registry_lib.load_policy(base, ctx.load_device)
        policy = lora.add_adapters(policy, cfg.lora, cfg.seed)
        if adapters_saved and saved is not None:
            lora.load_adapters(policy, torch.load(saved.path / state_lib.POLICY_ADAPTERS))
        policy = ctx.place(policy, trainable=True)
        if base == reference_path:
            reference: Any = lora.AdaptersOff(policy)  # no copy: the base is the reference
        else:
            log.warning("the latest policy is not its reference plus LoRA adapters: the "
                        "reference is loaded as its own copy this round")  # fmt: skip
            reference = ctx.load_policy(reference_path, trainable=False)[0]
        value, _ = registry_lib.load_rm(cfg.registry, cfg.base_model, ctx.load_device)
        value.requires_grad_(False)
        value.trunk = lora.add_adapters(value.trunk, cfg.lora, cfg.seed + 1)
        value.head.requires_grad_(True)
        if adapters_saved and saved is not None and saved.value_base == rm_id:
            lora.load_adapters(value, torch.load(saved.path / state_lib.VALUE_ADAPTERS))
        value = ctx.place(value, trainable=True)
        previous, ema = policy, None
    else:
        # The published weights are the EMA when one is kept; training continues the raw ones.
        raw = saved.raw_policy if continues and saved and saved.raw_policy else start
        policy, tok = ctx.load_policy(raw, trainable=True)
        reference = ctx.load_policy(reference_path, trainable=False)[0]
        previous = policy if raw == start else ctx.load_policy(start, trainable=False)[0]
        ema = None
        if c.ema_decay > 0:
            ema = previous if previous is not policy else ctx.load_policy(start, trainable=False)[0]
        if continues and saved is not None:
            value = models.load_reward_model(saved.value, ctx.load_device, registry_lib.MASTER)[0]
        else:
            value = ppo.value_model_from_rm(rm)
        value.requires_grad_(True)
        value = ctx.place(value, trainable=True)
    rm = ctx.place(rm, trainable=False)
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    opt = optimizer(params, c.lr, c.adam_betas)
    out = PPOModels(policy, reference, rm, value, previous, ema, tok, opt, 0, use_lora, rm_id)
    if continues and saved is not None:
        _restore_optimizer(ctx, out, saved)
        out.steps_before = saved.steps
    return out


def _restore_optimizer(ctx: RoundContext, m: PPOModels, saved: SavedState) -> None:
    state = torch.load(saved.optimizer, map_location="cpu")
    if m.use_lora and saved.value_base != m.rm_id:
        log.info("the reward model changed since the last round: fresh value adapters and AdamW")
        return
    if all(isinstance(k, int) for k in state.get("state", {})):
        # A state written by parameter number (before distributed training existed).
        if ctx.dist.sharded:
            log.warning("the saved AdamW state is numbered by parameter: starting it afresh")
            return
        m.opt.load_state_dict(state)
        for group in m.opt.param_groups:
            for p in group["params"]:
                for value in m.opt.state.get(p, {}).values():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        value.data = value.data.to(p.device)
    else:
        ctx.dist.load_optimizer_state(m.trained, m.opt, state)
    for group in m.opt.param_groups:
        group["lr"] = group["initial_lr"] = ctx.cfg.ppo.lr  # the configured LR, not the saved one


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (and buffers) of a model, gathered to rank 0's host memory.
    Every rank calls it; ranks other than 0 get an empty dict."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def save_state(
    ctx: RoundContext, m: PPOModels, out: Path | None, *, reference: str, beta: float, steps: int
) -> None:
    """Writes the trainer state into ``out`` on rank 0 (every rank calls it: the gathers are
    collectives). fp32: the next round continues these exact master weights."""
    main = out is not None
    if m.use_lora:
        policy_adapters = lora.adapter_state(trainable_state(m.policy))
        value_state = trainable_state(m.value)
        if main and out is not None:
            torch.save(policy_adapters, out / state_lib.POLICY_ADAPTERS)
            torch.save(value_state, out / state_lib.VALUE_ADAPTERS)
    else:
        if m.ema is not None:
            raw = ctx.dist.full_state_dict(m.policy)
            if main and out is not None:
                models.save_policy(m.policy, m.tok, out / state_lib.POLICY_DIR, None, raw)
        value = ctx.dist.full_state_dict(m.value)
        if main and out is not None:
            m.value.save(out / state_lib.VALUE_DIR, m.tok, None, value)
    opt_state = ctx.dist.optimizer_state(m.trained, m.opt)
    if main and out is not None:
        torch.save(opt_state, out / state_lib.OPTIMIZER_FILE)
        state_lib.write_info(out, reference=reference, beta=beta, steps=steps, lora=m.use_lora,
                             value_base=m.rm_id if m.use_lora else "")  # fmt: skip


def save_published(ctx: RoundContext, m: PPOModels, out: Path | None) -> None:
    """The published policy (EMA or raw; merged with LoRA) into ``out`` on rank 0."""
    state = ctx.dist.full_state_dict(m.published)
    if out is None or state is None:
        return
    if m.use_lora:
        state = lora.merged_state(state, ctx.cfg.lora)
    models.save_policy(lora.base_model(m.published), m.tok, out, ctx.publish_dtype, state)
