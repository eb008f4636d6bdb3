"""``rlhf train plan``: the memory plan of each round type for full fine-tuning on one GPU,
FSDP2 over the given GPUs, and LoRA over them (``trainer.plan``).

    rlhf train plan --size 7b --gpus 8 --gpu-memory-gib 80
    rlhf train plan --model models/tiny/policy --gpus 2 --device cpu
    rlhf train plan --table --gpus 8       (the README's table: every known size, PPO-ptx)

The batch sizes, lengths and memory levers are the trainer's own options (``--ppo.*``,
``--encoding.*``, ``--memory.*``, ``--lora.*``), so a plan describes the run they configure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from rlhf.config import option, parse_config, section
from trainer.config import EncodingConfig, GatesConfig, PPOConfig, RMConfig, SFTConfig
from trainer.distributed import DistributedConfig
from trainer.lora import LoRAConfig
from trainer.plan import (
    GIB,
    SHAPES,
    Batches,
    MemoryConfig,
    Plan,
    Setup,
    Shape,
    plan_round,
    setup_of,
)

ROUNDS = ("sft", "rm", "ppo")


@dataclass(frozen=True)
class PlanConfig:
    model: str = option("", "a model directory (its config.json gives the shape)")
    size: str = option("", f"or a known shape: {', '.join(SHAPES)}")
    gpus: int = option(8, "GPUs the FSDP2 and LoRA columns shard over (all nodes together)")
    gpu_memory_gib: float = option(80.0, "memory of one GPU")
    device: str = option("cuda", "cuda (bf16 compute) or cpu (fp32 compute)")
    table: bool = option(False, "print one line per known size (PPO-ptx rounds) instead")
    json: bool = option(False, "print the plans as JSON")
    sft: SFTConfig = section(SFTConfig, "SFT rounds (batch size)")
    rm: RMConfig = section(RMConfig, "RM rounds (prompts per step)")
    ppo: PPOConfig = section(PPOConfig, "PPO-ptx rounds (episodes, minibatch, ptx, EMA)")
    encoding: EncodingConfig = section(EncodingConfig, "sequence lengths")
    gates: GatesConfig = section(GatesConfig, "evaluation (eval_prompts sampled at once)")
    memory: MemoryConfig = section(MemoryConfig, "memory levers")
    lora: LoRAConfig = section(LoRAConfig, "LoRA rank and targets (the LoRA column)")
    distributed: DistributedConfig = section(DistributedConfig, "sharding of frozen models")

    def __post_init__(self) -> None:
        if not self.table and bool(self.model) == bool(self.size):
            raise ValueError("give exactly one of --model DIR and --size NAME (or --table)")
        if self.size and self.size not in SHAPES:
            raise ValueError(f"--size must be one of {', '.join(SHAPES)}, got {self.size!r}")
        if self.gpus < 1 or self.gpu_memory_gib <= 0:
            raise ValueError("--gpus must be >= 1 and --gpu-memory-gib > 0")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {self.device!r}")


def strategies(cfg: PlanConfig) -> dict[str, Setup]:
    """The three columns: full fine-tuning on one GPU, FSDP2 and LoRA over ``gpus``."""
    base = setup_of(cfg, gpus=cfg.gpus, sharded=True, cuda=cfg.device == "cuda")
    return {
        "full, 1 GPU": replace(base, gpus=1, sharded=False, lora=False),
        f"FSDP2, {cfg.gpus} GPUs": replace(base, lora=False),
        f"LoRA + FSDP2, {cfg.gpus} GPUs": replace(base, lora=True),
    }


def shape_of(cfg: PlanConfig) -> tuple[str, Shape]:
    if cfg.size:
        return cfg.size, SHAPES[cfg.size]
    return cfg.model, Shape.from_dir(Path(cfg.model))


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def describe(cfg: PlanConfig, name: str, shape: Shape) -> str:
    batches = replace(Batches.of(cfg), ema=cfg.ppo.ema_decay > 0)
    limit = cfg.gpu_memory_gib * GIB * cfg.memory.headroom
    cols = strategies(cfg)
    out = [
        f"memory plan of {name}: {shape.policy_params() / 1e9:.3f}B policy parameters, "
        f"{shape.rm_params() / 1e9:.3f}B reward model parameters, "
        f"{shape.lora_params(cfg.lora.rank, cfg.lora.target_modules) / 1e6:.2f}M LoRA "
        f"parameters (rank {cfg.lora.rank}); GiB per GPU, fits = at most "
        f"{limit / GIB:.1f} GiB ({cfg.memory.headroom:.0%} of {cfg.gpu_memory_gib:g})"
    ]
    for round_type in ROUNDS:
        plans = {col: plan_round(shape, round_type, s, batches) for col, s in cols.items()}
        lines = sorted({line for p in plans.values() for line in p.lines}, key=_order)
        out.append(f"\n  {round_type + ' round':<38}" + "".join(f" | {c:>24}" for c in cols))
        for line in lines:
            cells = "".join(f" | {_cell(p, line):>24}" for p in plans.values())
            out.append(f"  {line:<38}{cells}")
        out.append(f"  {'total':<38}" + "".join(f" | {_gib(p.total):>24}" for p in plans.values()))
        out.append(
            f"  {'fits':<38}"
            + "".join(f" | {'yes' if p.fits(limit) else 'NO':>24}" for p in plans.values())
        )
    return "\n".join(out)


def _order(line: str) -> tuple[int, str]:
    for i, word in enumerate(("policy", "value", "reward", "reference", "EMA", "FSDP2", "activ")):
        if line.startswith(word):
            return i, line
    return 99, line


def _cell(plan: Plan, line: str) -> str:
    return _gib(plan.lines[line]) if line in plan.lines else "-"


def table(cfg: PlanConfig) -> str:
    """PPO-ptx rounds (the largest) of every known size: total GiB per GPU per column."""
    batches = replace(Batches.of(cfg), ema=cfg.ppo.ema_decay > 0)
    limit = cfg.gpu_memory_gib * GIB * cfg.memory.headroom
    cols = strategies(cfg)
    rows = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, shape in SHAPES.items():
        cells = []
        for s in cols.values():
            p = plan_round(shape, "ppo", s, batches)
            cells.append(f"{p.total / GIB:.1f} GiB{'' if p.fits(limit) else ' (no)'}")
        rows.append(f"| {name} ({shape.policy_params() / 1e9:.2f}B) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    cfg = parse_config(
        PlanConfig,
        argv,
        prog="rlhf train plan",
        description="Per-GPU memory of each round type: full fine-tuning, FSDP2 and LoRA.",
        env_prefix="RLHF_PLAN_",
    )
    if cfg.table:
        print(table(cfg))
        return 0
    name, shape = shape_of(cfg)
    if cfg.json:
        batches = replace(Batches.of(cfg), ema=cfg.ppo.ema_decay > 0)
        plans = {
            col: {r: plan_round(shape, r, s, batches).lines for r in ROUNDS}
            for col, s in strategies(cfg).items()
        }
        print(json.dumps({"model": name, "plans": plans}))
        return 0
    print(describe(cfg, name, shape))
    return 0
