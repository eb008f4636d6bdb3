"""One ``streams`` setting for every component: topic prefix and split fractions, set once in
the environment (``RLHF_STREAMS__*``), each component's own setting overriding it."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from rlhf.config import load_config
from rlhf.seed import SeedConfig
from rlhf.streams import StreamsConfig
from services.feedback.server import FeedbackServerConfig
from services.policy.config import PolicyServerConfig
from services.reward.config import RewardServerConfig
from trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = [
    (TrainerConfig, "RLHF_TRAIN_"),
    (PolicyServerConfig, "RLHF_POLICY_"),
    (RewardServerConfig, "RLHF_REWARD_"),
    (FeedbackServerConfig, "RLHF_FEEDBACK_"),
    (SeedConfig, "RLHF_MODEL_"),
]
# What a component needs besides the shared section to build at all.
REQUIRED = {"RLHF_POLICY_MODEL__REGISTRY": "registry", "RLHF_REWARD_MODEL__REGISTRY": "registry"}


@pytest.mark.parametrize(("cls", "env_prefix"), COMPONENTS)
def test_every_component_reads_the_one_shared_setting(cls, env_prefix):
    shared = {"RLHF_STREAMS__TOPIC_PREFIX": "staging.", "RLHF_STREAMS__TEST_FRACTION": "0.1",
              **REQUIRED}  # fmt: skip
    cfg = load_config(cls, env=shared, env_prefix=env_prefix)
    assert cfg.streams == StreamsConfig(topic_prefix="staging.", test_fraction=0.1)
    assert cfg.streams.topics.prompts.name == "staging.rlhf.prompts"
    assert cfg.streams.topics.models.name == "staging.rlhf.models"
    # A component's own variable (or flag) wins over the shared one.
    own = {**shared, f"{env_prefix}STREAMS__TOPIC_PREFIX": "mine."}
    assert load_config(cls, env=own, env_prefix=env_prefix).streams.topic_prefix == "mine."
    flags = {"streams.validation_fraction": "0.2"}
    assert load_config(cls, env=shared, env_prefix=env_prefix, flags=flags).streams == (
        StreamsConfig(topic_prefix="staging.", validation_fraction=0.2, test_fraction=0.1)
    )


def test_a_bad_prefix_or_fractions_are_refused_with_the_setting_named():
    with pytest.raises(ValueError, match="streams.topic_prefix"):
        StreamsConfig(topic_prefix="has space")
    with pytest.raises(ValueError, match="leave room for train"):
        StreamsConfig(validation_fraction=0.6, test_fraction=0.4)


def test_kafka_topics_creates_the_prefixed_topics(kafka):
    prefix = f"p{uuid.uuid4().hex[:6]}."
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf", "kafka", "topics", "--bootstrap-servers",
         kafka.bootstrap_servers],
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "RLHF_STREAMS__TOPIC_PREFIX": prefix,
                       "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    try:
        names = {n for n in admin.list_topics() if n.startswith(prefix)}
    finally:
        admin.close()
    base = {"rlhf.prompts", "rlhf.comparisons", "rlhf.demonstrations", "rlhf.models"}
    assert names == {prefix + n for n in base} | {f"{prefix}{n}.dlq" for n in base}
