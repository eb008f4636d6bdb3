"""The trainer's rounds on CUDA, on both model families: fp32 master weights under bf16
autocast, an SFT round and a PPO-ptx round publish bf16 checkpoints (``publish_dtype`` auto)
with the encoding they trained with, which load back on CPU. Deselected where torch sees no
GPU."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file

from rlhf import bus, checkpoint, models
from rlhf.streams import StreamsConfig
from rlhf.v1 import events_pb2
from trainer.config import DataConfig, PPOConfig, ScheduleConfig, SFTConfig, TrainerConfig
from trainer.main import run
from trainer.reader import StreamTopics

CORPUS = Path(__file__).resolve().parents[1] / "data" / "pretrain.txt"


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["byte", "bpe"])
def test_sft_and_ppo_rounds_run_on_cuda(kafka, tmp_path, family):
    models.init_models(models.InitConfig(out=str(tmp_path / "base"), tokenizer=family))
    prefix = f"gpu-{uuid.uuid4().hex[:6]}."
    topics = StreamTopics.with_prefix(prefix)
    bus.ensure_topics(kafka.bootstrap_servers, [*topics.inputs(), topics.models])
    producer = bus.Producer(kafka.bootstrap_servers, client_id="test-gpu")
    for i in range(32):
        demo = events_pb2.DemonstrationEvent(
            event_id=uuid.uuid4().hex, prompt=f"{i:03d} tell me about rivers", response="the river runs to the sea",
            user_id=f"u{i}", split=events_pb2.SPLIT_TRAIN,
        )  # fmt: skip
        producer.send(topics.demonstrations, demo, key=demo.user_id)
    producer.close()
    cfg = TrainerConfig(
        bootstrap_servers=kafka.bootstrap_servers, group_id=prefix, streams=StreamsConfig(topic_prefix=prefix),
        registry=tmp_path / "registry", base_model=tmp_path / "base", pretrain_corpus=CORPUS,
        device="cuda", metrics_port=0, progress="off", data=DataConfig(poll_timeout_s=0.2),
        sft=SFTConfig(epochs=2, batch_size=8),
        ppo=PPOConfig(episodes=16, minibatch_size=8, iterations=2, gamma_ptx=1.0, ema_decay=0.0),
        schedule=ScheduleConfig(sft_min_new=32, ppo_min_new=32, ppo_needs_rm=False, max_rounds=2),
    )  # fmt: skip
    trainer = run(cfg, registry=CollectorRegistry(), serve_metrics=False)
    assert trainer.rounds_run == 2
    versions = checkpoint.list_versions(cfg.registry, "policy")
    kinds = [checkpoint.verify(cfg.registry / "policy" / v).round_type for v in versions]
    assert kinds == ["sft", "ppo"]
    for version in versions:
        path = cfg.registry / "policy" / version
        assert {t.dtype for t in load_file(str(path / "model.safetensors")).values()} == {
            torch.bfloat16
        }
        assert checkpoint.read_manifest(path).encoding["chat_template"] == (family == "bpe")
    model, _ = models.load_policy(cfg.registry / "policy" / versions[-1], "cpu")
    assert model.dtype == torch.float32
