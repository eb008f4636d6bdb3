"""Evaluation gates: a round's model is published only if it is no worse on held-out data.

The candidate and the currently published model are evaluated on the *same* validation
data at gate time (the validation buffers grow between rounds, so stored numbers would
compare different sets), with the same sampling seeds for policies. Each gate either passes
or names itself and says why it failed; a round with any failure publishes nothing.

    RM:     val accuracy >= previous - rm_accuracy_margin
    policy: mean RM reward on val prompts >= previous - reward_tolerance   (PPO rounds)
            mean KL to the lineage's fixed SFT reference <= kl_budget      (PPO rounds)
            win rate against that reference, judged by the RM >= min_win_rate (PPO rounds)
            pretraining loss <= previous * (1 + ptx_tolerance)             (alignment tax)
            val demonstration loss <= previous * (1 + sft_tolerance)       (SFT rounds)

A gate whose data is missing (too few val comparisons or prompts, no pretraining holdout)
is skipped and reported as skipped, not failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.config import GatesConfig


@dataclass(frozen=True)
class GateFailure:
    gate: str
    reason: str


@dataclass(frozen=True)
class GateResult:
    failures: tuple[GateFailure, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        if self.passed:
            return "passed" + (f" (skipped: {', '.join(self.skipped)})" if self.skipped else "")
        return "; ".join(f"{f.gate}: {f.reason}" for f in self.failures)


@dataclass(frozen=True)
class RMEval:
    """Pairwise accuracy of a reward model on held-out comparisons (None: no pairs)."""

    accuracy: float | None
    pairs: int


@dataclass(frozen=True)
class WinRate:
    """How often a policy's response beats the reference's on the same prompt (ties count
    half), with a 95 % Wilson score interval over the ``n`` prompts."""

    rate: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, outcomes: list[float], z: float = 1.96) -> WinRate:
        """``outcomes``: 1 win, 0.5 tie, 0 loss per prompt."""
        n = len(outcomes)
        if n == 0:
            return cls(0.5, 0.0, 1.0, 0)
        p = sum(outcomes) / n
        denom = 1 + z * z / n
        center = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        return cls(p, max(0.0, center - half), min(1.0, center + half), n)


@dataclass(frozen=True)
class PolicyEval:
    """A policy on held-out data; None where the data was missing."""

    mean_reward: float | None = None
    kl: float | None = None
    ptx_loss: float | None = None
    sft_loss: float | None = None
    prompts: int = 0
    win: WinRate | None = None  # against the lineage's fixed SFT reference, judged by the RM


def rm_gate(cfg: GatesConfig, candidate: RMEval, previous: RMEval | None) -> GateResult:
    if candidate.accuracy is None or candidate.pairs < cfg.min_val_comparisons:
        return GateResult(skipped=("rm_accuracy",))
    if previous is None or previous.accuracy is None:
        return GateResult()
    floor = previous.accuracy - cfg.rm_accuracy_margin
    if candidate.accuracy < floor:
        reason = (
            f"val accuracy {candidate.accuracy:.3f} < previous {previous.accuracy:.3f} "
            f"- margin {cfg.rm_accuracy_margin:.3f} on {candidate.pairs} pairs"
        )
        return GateResult((GateFailure("rm_accuracy", reason),))
    return GateResult()


def policy_gate(
    cfg: GatesConfig, round_type: str, candidate: PolicyEval, previous: PolicyEval | None
) -> GateResult:
    failures: list[GateFailure] = []
    skipped: list[str] = []
    prev = previous or PolicyEval()
    if round_type == "ppo":
        if candidate.mean_reward is None or candidate.prompts < cfg.min_val_prompts:
            skipped += ["reward", "kl"]
        else:
            if (
                prev.mean_reward is not None
                and candidate.mean_reward < prev.mean_reward - cfg.reward_tolerance
            ):
                failures.append(GateFailure(
                    "reward",
                    f"mean val reward {candidate.mean_reward:.4f} < previous {prev.mean_reward:.4f} "
                    f"- tolerance {cfg.reward_tolerance:.4f}",
                ))  # fmt: skip
            if candidate.kl is not None and candidate.kl > cfg.kl_budget:
                failures.append(
                    GateFailure(
                        "kl", f"KL to reference {candidate.kl:.3f} > budget {cfg.kl_budget:.3f}"
                    )
                )
            win = candidate.win
            if win is not None and win.rate < cfg.min_win_rate:
                failures.append(GateFailure(
                    "win_rate",
                    f"win rate vs the SFT reference {win.rate:.3f} (95% CI {win.low:.3f}-"
                    f"{win.high:.3f}, {win.n} prompts) < minimum {cfg.min_win_rate:.3f}",
                ))  # fmt: skip
    if candidate.ptx_loss is None or prev.ptx_loss is None:
        skipped.append("ptx_loss")
    elif candidate.ptx_loss > prev.ptx_loss * (1 + cfg.ptx_tolerance):
        failures.append(GateFailure(
            "ptx_loss",
            f"pretraining loss {candidate.ptx_loss:.4f} > previous {prev.ptx_loss:.4f} "
            f"x (1 + {cfg.ptx_tolerance})",
        ))  # fmt: skip
    if round_type == "sft":
        if candidate.sft_loss is None or prev.sft_loss is None:
            skipped.append("sft_loss")
        elif candidate.sft_loss > prev.sft_loss * (1 + cfg.sft_tolerance):
            failures.append(GateFailure(
                "sft_loss",
                f"val demonstration loss {candidate.sft_loss:.4f} > previous {prev.sft_loss:.4f} "
                f"x (1 + {cfg.sft_tolerance})",
            ))  # fmt: skip
    return GateResult(tuple(failures), tuple(skipped))
