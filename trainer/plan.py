"""The memory plan: what each model copy, the optimizer, the gradients and the activations of a
round cost per GPU, for full fine-tuning on one GPU, FSDP2 over N GPUs, and LoRA.

    rlhf train plan --size 7b --gpus 8 --gpu-memory-gib 80
    rlhf train plan --model models/tiny/policy --gpus 2 [--ppo.minibatch-size 64 ...]

What is counted (bytes per GPU; P parameters of a model, W GPUs sharing a sharded copy):

* a trainable copy (policy, value network): fp32 weights 4P, fp32 gradients 4P, AdamW's two
  fp32 moments 8P (DESIGN.md, "Precision"); sharded: each / W, plus the layers FSDP2 holds
  gathered at a time (two: the one computing and the one prefetched; bf16 on CUDA, and
  their fp32 gradients before the reduce-scatter);
* a frozen copy (reference, RM, EMA): fp32 weights 4P (/ W when sharded, 0 when offloaded);
* LoRA: the base is frozen (4P / W) and is the reference (no copy); the adapters train
  (16 bytes per adapter parameter); no EMA (``trainer.lora``);
* activations of one micro-batch (rows = batch / (W x grad_accumulation), rounded up) of the
  round's longest pass: per token and layer the inputs every linear layer keeps for its
  backward pass, about (10 h + 4 i) values (h hidden size, i MLP width; attention by SDPA
  keeps no T x T scores), bf16 on CUDA, fp32 on CPU; with activation checkpointing, h per
  token per layer plus one layer's worth. The logits of an LM pass add about 10 bytes per
  token per vocabulary entry (the logits, their fp32 log-softmax and its gradient). RM
  rounds count K = 9 responses per prompt (the paper's largest). PPO-ptx rounds count the
  largest of: the PPO pass (policy and value), the ptx pass, a rank's rollout (its episodes'
  KV cache, then one scoring pass over them: fp32 logits of every token) and the gates'
  evaluation (up to 64 prompts sampled and scored at once on every rank);
* CUDA's own context and allocator slack are not modelled: ``memory.headroom`` keeps that
  share of the GPU free.

The estimate of the activations is the rough part (kernels differ); the weights, gradients
and optimizer state are exact for the models built here (``tests/test_trainer_plan.py``
measures them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlhf.config import option

GIB = 1024**3
LOGIT_BYTES = 10  # per token per vocabulary entry of an LM pass that trains
RM_RESPONSES = 9  # K of an RM round, at its largest (PAPER.md: 4..9)


@dataclass(frozen=True)
class MemoryConfig:
    grad_accumulation: int = option(
        1, "micro-batches per optimizer step on each rank (same step, less activation memory)"
    )
    activation_checkpointing: bool = option(
        False, "recompute each decoder layer's activations in the backward pass"
    )
    check: bool = option(
        True, "refuse a round that the memory plan says does not fit the device's memory"
    )
    device_memory_gib: float = option(
        0.0, "memory per device to plan against; 0: the CUDA device's own (no check on CPU)"
    )
    headroom: float = option(0.9, "share of a device's memory the plan may fill")

    def __post_init__(self) -> None:
        if self.grad_accumulation < 1:
            raise ValueError("memory.grad_accumulation must be >= 1")
        if self.device_memory_gib < 0 or not 0 < self.headroom <= 1:
            raise ValueError("memory.device_memory_gib must be >= 0, memory.headroom in (0, 1]")


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's numbers (Llama / Qwen2 layout)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Shape:
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        return cls(
            hidden=hidden,
            layers=int(c["num_hidden_layers"]),
            intermediate=int(c["intermediate_size"]),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            vocab=int(c["vocab_size"]),
            tied=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)),
        )

    @classmethod
    def from_dir(cls, path: Path) -> Shape:
        return cls.from_config(json.loads((path / "config.json").read_text()))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by its module name."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate  # fmt: skip
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    def layer_params(self) -> int:
        linear = sum(a * b for a, b in self.linears().values())
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return linear + bias + 2 * self.hidden  # two RMSNorms

    def trunk_params(self) -> int:
        """The transformer without the LM head (what a reward model's trunk holds)."""
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden

    def policy_params(self) -> int:
        return self.trunk_params() + (0 if self.tied else self.vocab * self.hidden)

    def rm_params(self) -> int:
        return self.trunk_params() + self.hidden + 1  # the scalar head

    def lora_params(self, rank: int, targets: Sequence[str]) -> int:
        per_layer = sum(rank * (a + b) for n, (a, b) in self.linears().items() if n in targets)
        return self.layers * per_layer


# Published shapes of the models people train (Qwen2.5 0.5B/1.5B/7B, Llama 3.1 8B/70B).
SHAPES: dict[str, Shape] = {
    "0.5b": Shape(896, 24, 4864, 14, 2, 64, 151936, tied=True, qkv_bias=True),
    "1.5b": Shape(1536, 28, 8960, 12, 2, 128, 151936, tied=True, qkv_bias=True),
    "7b": Shape(3584, 28, 18944, 28, 4, 128, 152064, tied=False, qkv_bias=True),
    "8b": Shape(4096, 32, 14336, 32, 8, 128, 128256, tied=False, qkv_bias=False),
    "70b": Shape(8192, 80, 28672, 64, 8, 128, 128256, tied=False, qkv_bias=False),
}


@dataclass(frozen=True)
class Setup:
    """How a round is run: GPUs, sharding, LoRA and the memory levers."""

    gpus: int = 1
    sharded: bool = False
    lora: bool = False
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                     "gate_proj", "up_proj", "down_proj")  # fmt: skip
    shard_frozen: bool = True
    offload_frozen: bool = False
    grad_accumulation: int = 1
    activation_checkpointing: bool = False
    cuda: bool = True

    @property
    def compute_bytes(self) -> int:
        return 2 if self.cuda else 4


@dataclass(frozen=True)
class Batches:
    """The batch sizes and lengths of the three round types (from the trainer's config)."""

    sft_rows: int = 16
    rm_prompts: int = 8
    ppo_episodes: int = 64
    ppo_minibatch: int = 16
    ptx_rows: int = 128  # minibatch x ptx_ratio
    prompt_tokens: int = 64
    response_tokens: int = 128
    new_tokens: int = 32
    ptx_tokens: int = 64
    eval_prompts: int = 64
    ema: bool = True

    @classmethod
    def of(cls, cfg: Any) -> Batches:
        """From a TrainerConfig (or anything with its sft/rm/ppo/encoding/gates sections)."""
        p, e = cfg.ppo, cfg.encoding
        return cls(
            sft_rows=cfg.sft.batch_size, rm_prompts=cfg.rm.batch_prompts, ppo_episodes=p.episodes,
            ppo_minibatch=p.minibatch_size, ptx_rows=p.minibatch_size * p.ptx_ratio if p.gamma_ptx > 0 else 0,
            prompt_tokens=e.max_prompt_tokens, response_tokens=e.max_response_tokens,
            new_tokens=p.max_new_tokens, ptx_tokens=p.ptx_seq_len, ema=p.ema_decay > 0,
            eval_prompts=cfg.gates.eval_prompts,
        )  # fmt: skip


@dataclass(frozen=True)
class Plan:
    round_type: str
    setup: Setup
    lines: dict[str, float] = field(default_factory=dict)  # what -> bytes per GPU

    @property
    def total(self) -> float:
        return sum(self.lines.values())

    def fits(self, limit_bytes: float) -> bool:
        return self.total <= limit_bytes


def _rows(n: int, s: Setup) -> int:
    return max(1, math.ceil(n / (s.gpus * s.grad_accumulation))) if n else 0


def _activations(shape: Shape, s: Setup, rows: int, seq: int, *, logits: bool) -> float:
    tokens = rows * seq
    per_layer = (10 * shape.hidden + 4 * shape.intermediate) * s.compute_bytes
    if s.activation_checkpointing:
        acts = tokens * (shape.layers * shape.hidden * s.compute_bytes + per_layer)
    else:
        acts = tokens * shape.layers * per_layer
    return acts + (tokens * shape.vocab * LOGIT_BYTES if logits else 0)


def _rollout(shape: Shape, s: Setup, rows: int, seq: int) -> float:
    """A rank's rollout: the KV cache of its episodes while sampling, then one scoring pass
    over them (fp32 logits and their log-softmax), whichever is larger."""
    per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * s.compute_bytes
    return max(rows * seq * per_token + rows * shape.vocab * 8, rows * seq * shape.vocab * 8)


def plan_round(shape: Shape, round_type: str, setup: Setup, batches: Batches) -> Plan:
    """Per-GPU bytes of one round type (``sft``, ``rm`` or ``ppo``) run as ``setup``."""
    s, b = setup, batches
    w = s.gpus if s.sharded else 1
    wf = w if s.shard_frozen else 1
    frozen_factor = 0.0 if (s.offload_frozen and s.sharded and s.cuda) else 1.0 / wf
    pp, rp = shape.policy_params(), shape.rm_params()
    lines: dict[str, float] = {}

    def trainable(name: str, params: int) -> None:
        lines[f"{name} weights (fp32)"] = 4 * params / w
        lines[f"{name} gradients (fp32)"] = 4 * params / w
        lines[f"{name} AdamW state (fp32)"] = 8 * params / w

    def adapters(name: str, base: int, extra: int) -> None:
        lora = shape.lora_params(s.lora_rank, s.lora_targets) + extra
        lines[f"{name} base weights (fp32, frozen)"] = 4 * base * frozen_factor
        lines[f"{name} adapters + gradients + AdamW"] = 16 * lora / w

    lora_round = s.lora and round_type in ("sft", "ppo")
    if round_type == "sft":
        adapters("policy", pp, 0) if lora_round else trainable("policy", pp)
    elif round_type == "rm":
        trainable("reward model", rp)
    elif round_type == "ppo":
        if lora_round:
            adapters("policy", pp, 0)
            lines["reference (the policy's base)"] = 0.0
            adapters("value", rp - shape.hidden - 1, shape.hidden + 1)
        else:
            trainable("policy", pp)
            trainable("value", rp)
            lines["reference (fp32, frozen)"] = 4 * pp * frozen_factor
            if b.ema:
                lines["EMA of the policy (fp32)"] = 4 * pp * frozen_factor
        lines["reward model (fp32, frozen)"] = 4 * rp * frozen_factor
    else:
        raise ValueError(f"round type must be sft, rm or ppo, got {round_type!r}")
    if s.sharded:
        # Two layers gathered (computing + prefetched), and their unsharded fp32 gradients.
        lines["FSDP2 gathered layers"] = 2 * shape.layer_params() * (s.compute_bytes + 4)
    seq = b.prompt_tokens + b.response_tokens
    if round_type == "sft":
        acts = _activations(shape, s, _rows(b.sft_rows, s), seq, logits=True)
    elif round_type == "rm":
        acts = _activations(shape, s, _rows(b.rm_prompts * RM_RESPONSES, s), seq, logits=False)
    else:
        ppo_seq = b.prompt_tokens + b.new_tokens
        acts = max(
            _activations(shape, s, _rows(b.ppo_minibatch, s), ppo_seq, logits=True)
            + _activations(shape, s, _rows(b.ppo_minibatch, s), ppo_seq, logits=False),
            _activations(shape, s, _rows(b.ptx_rows, s), b.ptx_tokens, logits=True),
            _rollout(shape, s, max(1, math.ceil(b.ppo_episodes / w)), ppo_seq),
            # The gates' evaluation samples up to 64 prompts at once on every rank.
            _rollout(shape, s, min(64, b.eval_prompts), ppo_seq),
        )
    lines["activations (one micro-batch)"] = acts
    return Plan(round_type, s, lines)


def what_fits(
    shape: Shape, round_type: str, setup: Setup, batches: Batches, limit_bytes: float
) -> str | None:
    """The first option, in order of cost to the run, that makes a round fit; None if
    nothing short of a bigger GPU does."""
    s = setup
    tries: list[tuple[str, Setup]] = []
    if s.sharded and s.cuda and not s.offload_frozen and round_type == "ppo":
        tries.append(("--distributed.offload-frozen true", replace(s, offload_frozen=True)))
    if not s.activation_checkpointing:
        tries.append(("--memory.activation-checkpointing true",
                      replace(s, activation_checkpointing=True)))  # fmt: skip
    for factor in (2, 4, 8, 16):
        acc = s.grad_accumulation * factor
        tries.append((f"--memory.grad-accumulation {acc}", replace(s, grad_accumulation=acc)))
    if not s.lora and round_type in ("sft", "ppo"):
        tries.append(("--lora.enabled true --ppo.ema-decay 0", replace(s, lora=True)))
    for option_, candidate in tries:
        if plan_round(shape, round_type, candidate, batches).fits(limit_bytes):
            return f"{option_} (plan: {plan_round(shape, round_type, candidate, batches).total / GIB:.1f} GiB per GPU)"
    for gpus in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if gpus <= s.gpus:
            continue
        candidate = replace(s, gpus=gpus, sharded=True)
        if plan_round(shape, round_type, candidate, batches).fits(limit_bytes):
            return f"torchrun over {gpus} GPUs (plan: {plan_round(shape, round_type, candidate, batches).total / GIB:.1f} GiB per GPU)"
    return None


class DoesNotFit(Exception):
    """The plan says a round needs more memory than a device has."""


def check(
    shape: Shape, round_type: str, setup: Setup, batches: Batches, limit_bytes: float
) -> Plan:
    """The plan of a round that fits; raises ``DoesNotFit`` naming what would make it fit."""
    plan = plan_round(shape, round_type, setup, batches)
    if plan.fits(limit_bytes):
        return plan
    remedy = what_fits(shape, round_type, setup, batches, limit_bytes)
    raise DoesNotFit(
        f"the memory plan of this {round_type} round needs {plan.total / GIB:.1f} GiB per "
        f"device, more than the {limit_bytes / GIB:.1f} GiB it may use; "
        + (f"it fits with {remedy}" if remedy else "no memory option makes it fit")
        + " (rlhf train plan shows the whole plan)"
    )


def setup_of(cfg: Any, *, gpus: int, sharded: bool, cuda: bool) -> Setup:
    """The Setup a TrainerConfig describes on ``gpus`` devices."""
    return Setup(
        gpus=gpus, sharded=sharded, lora=cfg.lora.enabled, lora_rank=cfg.lora.rank,
        lora_targets=tuple(cfg.lora.target_modules), shard_frozen=cfg.distributed.shard_frozen,
        offload_frozen=cfg.distributed.offload_frozen,
        grad_accumulation=cfg.memory.grad_accumulation,
        activation_checkpointing=cfg.memory.activation_checkpointing, cuda=cuda,
    )  # fmt: skip


def check_round(cfg: Any, round_type: str, dist: Any) -> Plan | None:
    """The trainer's check before a round: the plan of the model it would train, on this
    job's devices (``memory.device_memory_gib``, else the CUDA device's memory; nothing to
    check on CPU without it). Raises ``DoesNotFit``."""
    import torch

    from trainer import registry as registry_lib

    m = cfg.memory
    cuda = "cuda" in dist.device
    if not m.check:
        return None
    if m.device_memory_gib:
        limit = m.device_memory_gib * GIB
    elif cuda:
        limit = torch.cuda.get_device_properties(torch.device(dist.device)).total_memory
    else:
        return None
    shape = Shape.from_dir(registry_lib.policy_dir(cfg.registry, cfg.base_model))
    setup = setup_of(cfg, gpus=dist.world, sharded=dist.sharded, cuda=cuda)
    return check(shape, round_type, setup, Batches.of(cfg), limit * m.headroom)
