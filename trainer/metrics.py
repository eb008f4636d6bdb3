"""Prometheus metrics of the online trainer (scraped from ``/metrics`` of ``rlhf train``).

Everything is registered on the registry passed in, so tests use a fresh
``CollectorRegistry()`` and a process may run several trainers side by side.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROUND_TYPES = ("sft", "rm", "ppo")


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rounds = Counter(
            "rlhf_trainer_rounds_total",
            "Training rounds by type and outcome (published, gate_failed, error)",
            ["type", "outcome"],
            registry=registry,
        )
        self.round_duration = Histogram(
            "rlhf_trainer_round_duration_seconds",
            "Wall time of a round from start to publish or rejection",
            ["type"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
            registry=registry,
        )
        self.gate_failures = Counter(
            "rlhf_trainer_gate_failures_total",
            "Rounds held back by an evaluation gate, by round type and gate",
            ["type", "gate"],
            registry=registry,
        )
        self.loss = Gauge(
            "rlhf_trainer_loss",
            "Mean training loss of the last round, by round type and loss",
            ["type", "loss"],
            registry=registry,
        )
        self.rm_accuracy = Gauge(
            "rlhf_trainer_rm_accuracy",
            "Pairwise accuracy of the last evaluated reward model on held-out comparisons",
            ["split"],
            registry=registry,
        )
        self.mean_reward = Gauge(
            "rlhf_trainer_mean_reward",
            "Mean RM reward of the last evaluated policy on val prompts",
            registry=registry,
        )
        self.kl = Gauge(
            "rlhf_trainer_kl",
            "Mean KL (nats per response) of the last evaluated policy to its SFT reference",
            registry=registry,
        )
        self.win_rate = Gauge(
            "rlhf_trainer_win_rate",
            "Share of val prompts on which the last evaluated policy beat its lineage's SFT "
            "reference (judged by the RM, ties half): the estimate and its 95% interval bounds",
            ["bound"],
            registry=registry,
        )
        self.kl_beta = Gauge(
            "rlhf_trainer_kl_beta", "Current KL penalty coefficient beta", registry=registry
        )
        self.clip_fraction = Gauge(
            "rlhf_trainer_clip_fraction",
            "Fraction of tokens whose PPO ratio was clipped in the last round",
            registry=registry,
        )
        self.entropy = Gauge(
            "rlhf_trainer_entropy",
            "Mean per-token policy entropy of the last PPO round's rollouts",
            registry=registry,
        )
        self.value_loss = Gauge(
            "rlhf_trainer_value_loss", "Value loss of the last PPO round", registry=registry
        )
        self.ptx_loss = Gauge(
            "rlhf_trainer_ptx_loss",
            "Pretraining LM loss (nats per token) of the last PPO-ptx round",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "rlhf_trainer_consumer_lag",
            "Records in Kafka not yet read by the trainer, by topic",
            ["topic"],
            registry=registry,
        )
        self.records = Counter(
            "rlhf_trainer_records_total",
            "Records read from Kafka by topic and what happened to them (accepted or the rejection reason)",
            ["topic", "outcome"],
            registry=registry,
        )
        self.parked = Counter(
            "rlhf_trainer_records_parked_total",
            "Pending records taken out of training after schedule.park_after_failures rounds "
            "held back by gates, by kind (labelled ones go to <topic>.parked)",
            ["kind"],
            registry=registry,
        )
        self.buffered = Gauge(
            "rlhf_trainer_buffered_records",
            "Records held in the training buffers, by kind and split",
            ["kind", "split"],
            registry=registry,
        )
        self.checkpoints = Counter(
            "rlhf_trainer_checkpoints_published_total",
            "Checkpoints published to the registry, by role",
            ["role"],
            registry=registry,
        )
        self.last_checkpoint = Gauge(
            "rlhf_trainer_last_checkpoint_timestamp_seconds",
            "Unix time of the last published checkpoint, by role",
            ["role"],
            registry=registry,
        )
        self.phase_seconds = Counter(
            "rlhf_trainer_phase_seconds_total",
            "Time spent in each phase of rounds (generation, training, evaluation, publish)",
            ["type", "phase"],
            registry=registry,
        )
        for round_type in ROUND_TYPES:
            self.round_duration.labels(type=round_type)
            for outcome in ("published", "gate_failed", "error"):
                self.rounds.labels(type=round_type, outcome=outcome)

    def set_losses(self, round_type: str, losses: Mapping[str, float]) -> None:
        for name, value in losses.items():
            self.loss.labels(type=round_type, loss=name).set(value)

    def record_round(self, round_type: str, m: Mapping[str, float]) -> None:
        """The gauges of a round's candidate, from its manifest metrics."""
        if round_type == "sft":
            self.set_losses("sft", {"sft": m["sft_loss"]})
            if "val_ptx_loss" in m:
                self.ptx_loss.set(m["val_ptx_loss"])
        elif round_type == "rm":
            self.set_losses("rm", {"rm": m["rm_loss"]})
            for split in ("val", "test"):
                if f"{split}_accuracy" in m:
                    self.rm_accuracy.labels(split=split).set(m[f"{split}_accuracy"])
        elif round_type == "ppo":
            losses = {"policy": m["train_policy_loss"], "value": m["train_value_loss"],
                      "ptx": m["train_ptx_loss"]}  # fmt: skip
            self.set_losses("ppo", losses)
            self.clip_fraction.set(m["train_clip_frac"])
            self.entropy.set(m["train_entropy"])
            self.value_loss.set(m["train_value_loss"])
            self.ptx_loss.set(m["train_ptx_loss"])
            self.kl_beta.set(m["beta"])
            if "val_mean_reward" in m:
                self.mean_reward.set(m["val_mean_reward"])
            if "val_kl" in m:
                self.kl.set(m["val_kl"])
            if "val_win_rate" in m:
                self.win_rate.labels(bound="estimate").set(m["val_win_rate"])
                self.win_rate.labels(bound="low").set(m["val_win_rate_low"])
                self.win_rate.labels(bound="high").set(m["val_win_rate_high"])
