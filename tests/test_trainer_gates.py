"""Evaluation gates pass or fail with a named reason; the trainer's config validates itself."""

from __future__ import annotations

import pytest

from rlhf.config import load_config
from trainer import evaluate
from trainer.config import PPOConfig, TrainerConfig
from trainer.gates import GatesConfig, PolicyEval, RMEval, WinRate, policy_gate, rm_gate

CFG = GatesConfig(rm_accuracy_margin=0.02, reward_tolerance=0.0, kl_budget=5.0,
                  ptx_tolerance=0.05, sft_tolerance=0.05, min_val_comparisons=8, min_val_prompts=8)  # fmt: skip


def test_rm_gate_allows_a_small_drop_within_the_margin():
    assert rm_gate(CFG, RMEval(0.79, 100), RMEval(0.80, 100)).passed
    assert rm_gate(CFG, RMEval(0.90, 100), RMEval(0.80, 100)).passed


def test_rm_gate_fails_below_the_margin_and_says_why():
    result = rm_gate(CFG, RMEval(0.70, 100), RMEval(0.80, 100))
    assert not result.passed
    assert [f.gate for f in result.failures] == ["rm_accuracy"]
    assert "0.700 < previous 0.800" in result.describe()


def test_rm_gate_is_skipped_without_enough_val_comparisons():
    result = rm_gate(CFG, RMEval(0.10, 3), RMEval(0.90, 3))
    assert result.passed and result.skipped == ("rm_accuracy",)
    assert rm_gate(CFG, RMEval(0.6, 50), None).passed  # the first RM has nothing to beat


def test_policy_gate_passes_a_better_ppo_policy():
    before = PolicyEval(mean_reward=-1.0, kl=0.0, ptx_loss=2.0, prompts=64)
    after = PolicyEval(mean_reward=-0.5, kl=3.0, ptx_loss=2.05, prompts=64)
    assert policy_gate(CFG, "ppo", after, before).passed


@pytest.mark.parametrize(
    ("after", "gate", "reason"),
    [
        (PolicyEval(mean_reward=-1.2, kl=1.0, ptx_loss=2.0, prompts=64), "reward", "mean val reward -1.2000 < previous -1.0000"),
        (PolicyEval(mean_reward=0.0, kl=7.5, ptx_loss=2.0, prompts=64), "kl", "KL to reference 7.500 > budget 5.000"),
        (PolicyEval(mean_reward=0.0, kl=1.0, ptx_loss=2.2, prompts=64), "ptx_loss", "pretraining loss 2.2000 > previous 2.0000"),
    ],
)  # fmt: skip
def test_policy_gate_names_each_failing_gate(after, gate, reason):
    before = PolicyEval(mean_reward=-1.0, kl=0.0, ptx_loss=2.0, prompts=64)
    result = policy_gate(CFG, "ppo", after, before)
    assert [f.gate for f in result.failures] == [gate]
    assert reason in result.describe()


def test_policy_gate_reports_every_failure_at_once():
    before = PolicyEval(mean_reward=0.0, ptx_loss=2.0, prompts=64)
    after = PolicyEval(mean_reward=-1.0, kl=9.0, ptx_loss=3.0, prompts=64)
    assert {f.gate for f in policy_gate(CFG, "ppo", after, before).failures} == {
        "reward",
        "kl",
        "ptx_loss",
    }


def test_sft_rounds_gate_on_val_demonstration_loss_not_reward():
    before = PolicyEval(sft_loss=2.0, ptx_loss=2.0)
    assert policy_gate(CFG, "sft", PolicyEval(sft_loss=2.05, ptx_loss=2.0), before).passed
    failed = policy_gate(CFG, "sft", PolicyEval(sft_loss=2.5, ptx_loss=2.0), before)
    assert [f.gate for f in failed.failures] == ["sft_loss"]


def test_policy_gate_skips_reward_and_kl_without_val_prompts():
    result = policy_gate(
        CFG, "ppo", PolicyEval(mean_reward=-9.0, kl=99.0, prompts=2), PolicyEval(mean_reward=0.0)
    )
    assert result.passed and {"reward", "kl", "ptx_loss"} <= set(result.skipped)


def test_config_defaults_follow_the_paper():
    cfg = TrainerConfig()
    assert (cfg.ppo.beta, cfg.ppo.gamma_ptx, cfg.ppo.ptx_ratio, cfg.ppo.clip) == (
        0.02,
        27.8,
        8,
        0.2,
    )
    assert (cfg.ppo.gae_gamma, cfg.ppo.gae_lambda, cfg.ppo.ema_decay) == (1.0, 0.95, 0.992)
    assert cfg.ppo.adam_betas == cfg.rm.adam_betas == cfg.sft.adam_betas == (0.9, 0.95)
    assert cfg.data.user_prompt_cap == 200 and cfg.sft.lr_final_ratio == 0.1


def test_config_parses_nested_flags_and_env_and_rejects_bad_values():
    cfg = load_config(TrainerConfig, env={"RLHF_TRAIN_PPO__BETA": "0.05"}, env_prefix="RLHF_TRAIN_",
                      flags={"ppo.gamma_ptx": "2.5", "rm.adam_betas": "0.9,0.99"})  # fmt: skip
    assert (cfg.ppo.beta, cfg.ppo.gamma_ptx, cfg.rm.adam_betas) == (0.05, 2.5, (0.9, 0.99))
    with pytest.raises(ValueError, match="minibatch_size"):
        PPOConfig(episodes=8, minibatch_size=16)
    with pytest.raises(ValueError, match="device"):
        TrainerConfig(device="tpu")
    with pytest.raises(ValueError, match="adam_betas"):
        load_config(TrainerConfig, flags={"sft.adam_betas": "0.9"})


def test_win_rate_has_a_wilson_interval_and_ties_count_half():
    # 48 wins of 64: p = 0.75; z = 1.96, z²/n = 0.060025, centre (0.75 + 0.0300125) / 1.060025
    # = 0.73585, half-width 1.96 · sqrt(0.75 · 0.25 / 64 + 3.8416 / 16384) / 1.060025 = 0.10401.
    win = WinRate.of([1.0] * 48 + [0.0] * 16)
    assert (win.rate, win.n) == (0.75, 64)
    assert win.low == pytest.approx(0.63184, abs=1e-4) and win.high == pytest.approx(
        0.83986, abs=1e-4
    )
    # Identical answers tie: exactly one half, whatever the number of prompts.
    assert evaluate.win_rate([0.3, -1.0], [0.3, -1.0]).rate == 0.5
    assert evaluate.win_rate([1.0, 0.0, 2.0], [0.0, 1.0, 2.0]).rate == pytest.approx(0.5)
    with pytest.raises(ValueError):
        evaluate.win_rate([1.0], [])


def test_ppo_gate_holds_back_a_policy_below_the_minimum_win_rate():
    cfg = GatesConfig(min_win_rate=0.5, min_val_prompts=8)
    before = PolicyEval(mean_reward=-1.0, kl=0.0, ptx_loss=2.0, prompts=64)
    losing = PolicyEval(mean_reward=-0.5, kl=1.0, ptx_loss=2.0, prompts=64,
                        win=WinRate.of([1.0] * 20 + [0.0] * 44))  # fmt: skip
    result = policy_gate(cfg, "ppo", losing, before)
    assert [f.gate for f in result.failures] == ["win_rate"]
    assert "win rate vs the SFT reference 0.312" in result.describe()
    winning = PolicyEval(mean_reward=-0.5, kl=1.0, ptx_loss=2.0, prompts=64,
                         win=WinRate.of([1.0] * 40 + [0.5] * 24))  # fmt: skip
    assert policy_gate(cfg, "ppo", winning, before).passed
    assert policy_gate(GatesConfig(min_win_rate=0.0), "ppo", losing, before).passed
