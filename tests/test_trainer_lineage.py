"""Lineages and trainer state against a real broker: PPO-ptx measures KL against a fixed SFT
reference named in every manifest, SFT rounds never continue a PPO output, and the trainer
state (raw weights, value network, AdamW, warm-up, β) carries across rounds and restarts
with the paper's EMA of weights on."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf import bus, checkpoint, encoding, models
from rlhf.streams import StreamsConfig
from tests.trainer_support import CORPUS, Process, produce
from trainer import evaluate
from trainer import state as state_lib
from trainer.config import (
    DataConfig,
    GatesConfig,
    PPOConfig,
    ScheduleConfig,
    SFTConfig,
    TrainerConfig,
)
from trainer.reader import StreamTopics
from trainer.registry import load_rm


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_ppo_lineages_keep_a_fixed_reference_and_carry_the_trainer_state(kafka, tmp_path):
    models.init_models(models.InitConfig(out=str(tmp_path / "base")))
    prefix = f"lineage-{uuid.uuid4().hex[:6]}."
    topics = StreamTopics.with_prefix(prefix)
    bus.ensure_topics(kafka.bootstrap_servers, [*topics.inputs(), topics.models])
    cfg = TrainerConfig(
        bootstrap_servers=kafka.bootstrap_servers, group_id=prefix, streams=StreamsConfig(topic_prefix=prefix),
        registry=tmp_path / "registry", base_model=tmp_path / "base", pretrain_corpus=CORPUS,
        device="cpu", metrics_port=0, progress="off", data=DataConfig(poll_timeout_s=0.2),
        sft=SFTConfig(epochs=1, batch_size=8),
        # The paper's EMA (0.992) and an adaptive β, so every piece of state is exercised.
        ppo=PPOConfig(episodes=8, minibatch_size=4, iterations=1, gamma_ptx=1.0, ptx_ratio=1,
                      warmup_iters=10, adaptive_kl=True, kl_horizon=100, max_new_tokens=12),
        gates=GatesConfig(enabled=False, eval_prompts=16),
        schedule=ScheduleConfig(ppo_needs_rm=False),
    )  # fmt: skip
    registry = cfg.registry
    produce(kafka, topics, demos=8, prompts=24, val=8)

    first = Process(cfg, topics, kafka)
    first.read(demos=8, prompts=32)
    sft = first.round("sft")
    assert sft.parent is None and sft.reference == sft.version  # a lineage starts
    ppo1 = first.round("ppo")
    assert (ppo1.parent, ppo1.reference) == (sft.version, sft.version)
    state1 = registry / state_lib.ROLE / ppo1.version
    assert checkpoint.verify(state1).version == ppo1.version
    info1 = json.loads((state1 / state_lib.STATE_FILE).read_text())
    assert info1["steps"] == 2 and info1["reference"] == sft.version
    assert info1["beta"] == ppo1.metrics["beta"] != cfg.ppo.beta  # adapted, and carried
    # With the EMA on, the published weights are the EMA and the raw weights are kept beside:
    # two steps at decay 0.992 move the EMA ~1.6 % of the way the raw weights moved.
    s, pub, raw = weights(registry / "policy" / sft.version), weights(registry / "policy" / ppo1.version), weights(state1 / "policy")  # fmt: skip
    moved = sum(float((raw[k] - s[k]).norm()) for k in s)
    assert 0 < sum(float((pub[k] - s[k]).norm()) for k in s) < 0.03 * moved
    first.close()

    # A restart continues the lineage from the saved state, not from the published EMA.
    second = Process(cfg, topics, kafka)
    second.read(prompts=32)
    ppo2 = second.round("ppo")
    assert (ppo2.parent, ppo2.reference) == (ppo1.version, sft.version)
    state2 = registry / state_lib.ROLE / ppo2.version
    info2 = json.loads((state2 / state_lib.STATE_FILE).read_text())
    assert info2["steps"] == 4 and ppo2.metrics["lineage_steps"] == 4
    adam = torch.load(state2 / state_lib.OPTIMIZER_FILE)
    assert all(int(s["step"]) == 4 for s in adam["state"].values())
    assert not state1.exists()  # only the latest policy's state is kept
    # KL (gate and manifest) is measured against the fixed SFT reference, not the parent.
    prompts = [p.prompt for p in second.reader.data.prompts["val"]][-cfg.gates.eval_prompts :]
    tuned, tok = models.load_policy(registry / "policy" / ppo2.version)
    rm, _ = load_rm(registry, cfg.base_model, "cpu")
    kwargs = dict(max_new_tokens=cfg.ppo.max_new_tokens, temperature=1.0, seed=cfg.seed)
    ref_policy = models.load_policy(registry / "policy" / sft.version)[0]
    spec = encoding.spec_for_model(registry / "policy" / ppo2.version, tok)
    to_reference = evaluate.sample_and_score(tuned, ref_policy, rm, tok, spec, prompts, **kwargs)
    assert ppo2.metrics["val_kl"] == pytest.approx(sum(to_reference.kl) / len(prompts), abs=1e-4)

    # New demonstrations: the SFT round continues the reference, never the PPO output, and
    # starts a new lineage whose first PPO round starts fresh.
    produce(kafka, topics, demos=8)
    second.read(demos=8)
    sft2 = second.round("sft")
    assert (sft2.parent, sft2.reference) == (sft.version, sft2.version)
    ppo3 = second.round("ppo")
    assert (ppo3.parent, ppo3.reference) == (sft2.version, sft2.version)
    assert ppo3.metrics["lineage_steps"] == 2
    second.close()
