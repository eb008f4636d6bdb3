"""Evaluation gates: a round's model is published only if it is no worse on held-out data.

The candidate and the currently published model are evaluated on the *same* validation
data at gate time (the validation buffers grow between rounds, so stored numbers would
compare different sets), with the same sampling seeds for policies. Each gate either passes
or names itself and says why it failed; a round with any failure publishes nothing.

    RM:     val accuracy >= previous - rm_accuracy_margin
    policy: mean RM reward on val prompts >= previous - reward_tolerance   (PPO rounds)
            mean KL to the SFT reference <= kl_budget                      (PPO rounds)
            pretraining loss <= previous * (1 + ptx_tolerance)             (alignment tax)
            val demonstration loss <= previous * (1 + sft_tolerance)       (SFT rounds)

A gate whose data is missing (too few val comparisons or prompts, no pretraining holdout)
is skipped and reported as skipped, not failed.
"""

from __future__ import annotations

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
class PolicyEval:
    """A policy on held-out data; None where the data was missing."""

    mean_reward: float | None = None
    kl: float | None = None
    ptx_loss: float | None = None
    sft_loss: float | None = None
    prompts: int = 0


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
