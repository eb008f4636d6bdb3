"""The memory plan against what the models really hold, and the trainer refusing a round the
plan says does not fit (then running it with the option the refusal named).

Measured: parameters (policy, reward model), fp32 weight, gradient and AdamW-state bytes
after a real optimizer step, LoRA adapter parameters, and, over two gloo processes, the
bytes of each rank's FSDP2 shards (the plan's figure / 2, up to FSDP2's padding of each
parameter's first dimension to a multiple of the world size), and of a frozen model sharded
or, with ``distributed.shard_frozen`` false, whole on each rank."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from prometheus_client import CollectorRegistry

from rlhf import bus, checkpoint, models
from rlhf.streams import StreamsConfig
from trainer.config import DataConfig, ScheduleConfig, SFTConfig, TrainerConfig
from trainer.distributed import Dist, DistributedConfig, local_bytes
from trainer.lora import LoRAConfig, add_adapters
from trainer.main import run
from trainer.plan import GIB, Batches, MemoryConfig, Setup, Shape, plan_round
from trainer.reader import StreamTopics

CORPUS = Path(__file__).resolve().parents[1] / "data" / "pretrain.txt"


def one_step(model: torch.nn.Module) -> torch.optim.AdamW:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, 100, (2, 12))
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().mean().backward()
    opt.step()
    return opt


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return local_bytes(t for s in opt.state.values() for t in s.values() if t.dim() > 0)


@pytest.mark.parametrize(("size", "family"), [("tiny", "byte"), ("small", "bpe")])
def test_the_plan_counts_what_the_models_hold(tmp_path, size, family):
    models.init_models(models.InitConfig(out=str(tmp_path), size=size, tokenizer=family))
    shape = Shape.from_dir(tmp_path / "policy")
    policy, _ = models.load_policy(tmp_path / "policy", "cpu", torch.float32)
    rm, _ = models.load_reward_model(tmp_path / "reward", "cpu", torch.float32)
    assert shape.policy_params() == sum(p.numel() for p in policy.parameters())
    assert shape.rm_params() == sum(p.numel() for p in rm.parameters())

    opt = one_step(policy)
    lines = plan_round(shape, "sft", Setup(cuda=False), Batches()).lines
    assert lines["policy weights (fp32)"] == local_bytes(policy.parameters())
    assert lines["policy gradients (fp32)"] == local_bytes(p.grad for p in policy.parameters())
    assert lines["policy AdamW state (fp32)"] == state_bytes(opt)

    lora = LoRAConfig(rank=8)
    adapted = add_adapters(policy, lora)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert shape.lora_params(lora.rank, lora.target_modules) == trainable
    lora_lines = plan_round(
        shape, "sft", Setup(cuda=False, lora=True, lora_rank=8), Batches()
    ).lines
    assert lora_lines["policy adapters + gradients + AdamW"] == 16 * trainable


def _shard_and_measure(rank: int, world: int, port: int, model_dir: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist = Dist.start(DistributedConfig(), "cpu")
    try:
        policy, _ = models.load_policy(model_dir, "cpu", torch.float32)
        policy = dist.shard(policy, trainable=True)
        opt = one_step(policy)
        out[rank] = (local_bytes(policy.parameters()), state_bytes(opt))
        # Frozen models: sharded like the trained ones, or whole on every rank.
        for shard_frozen in (True, False):
            placed = Dist(DistributedConfig(shard_frozen=shard_frozen), rank=rank, world=world)
            frozen, _ = models.load_policy(model_dir, "cpu", torch.float32)
            frozen = placed.shard(frozen.requires_grad_(False), trainable=False)
            out[(rank, shard_frozen)] = local_bytes(frozen.parameters())
    finally:
        dist.close()


def test_fsdp2_shards_hold_what_the_plan_says(tmp_path):
    models.init_models(models.InitConfig(out=str(tmp_path)))
    shape = Shape.from_dir(tmp_path / "policy")
    lines = plan_round(shape, "sft", Setup(gpus=2, sharded=True, cuda=False), Batches()).lines
    from rlhf.kafka_local import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_shard_and_measure, args=(2, free_port(), str(tmp_path / "policy"), out), nprocs=2)
        everything = dict(out)
    measured = {rank: everything[rank] for rank in range(2)}
    frozen = {key: v for key, v in everything.items() if isinstance(key, tuple)}
    # Padding: each parameter's first dimension is rounded up to a multiple of 2.
    padding = 4 * sum(p[0].numel() for p in models.load_policy(tmp_path / "policy")[0].parameters())
    for weights, adam in measured.values():
        assert abs(weights - lines["policy weights (fp32)"]) <= padding
        assert abs(adam - lines["policy AdamW state (fp32)"]) <= 2 * padding
    assert sum(w for w, _ in measured.values()) >= 4 * shape.policy_params()
    for shard_frozen in (True, False):
        setup = Setup(gpus=2, sharded=True, cuda=False, shard_frozen=shard_frozen)
        planned = plan_round(shape, "ppo", setup, Batches()).lines["reference (fp32, frozen)"]
        for rank in range(2):
            assert abs(frozen[(rank, shard_frozen)] - planned) <= (padding if shard_frozen else 0)


def test_a_round_that_does_not_fit_is_refused_and_runs_with_the_named_option(
    kafka, tmp_path, caplog
):
    models.init_models(models.InitConfig(out=str(tmp_path / "base")))
    prefix = f"plan-{uuid.uuid4().hex[:6]}."
    topics = StreamTopics.with_prefix(prefix)
    bus.ensure_topics(kafka.bootstrap_servers, [*topics.inputs(), topics.models])
    from tests.test_trainer_rounds import produce_demos

    produce_demos(kafka, topics, 8)
    shape = Shape.from_dir(tmp_path / "base" / "policy")

    def config(memory: MemoryConfig) -> TrainerConfig:
        return TrainerConfig(
            bootstrap_servers=kafka.bootstrap_servers, group_id=prefix, streams=StreamsConfig(topic_prefix=prefix),
            registry=tmp_path / "registry", base_model=tmp_path / "base", pretrain_corpus=CORPUS,
            device="cpu", metrics_port=0, progress="off", data=DataConfig(poll_timeout_s=0.2),
            sft=SFTConfig(epochs=1, batch_size=8), memory=memory,
            schedule=ScheduleConfig(sft_min_new=8, max_rounds=1),
        )  # fmt: skip

    # A device just big enough for the round with activation checkpointing, not without.
    batches = Batches.of(config(MemoryConfig()))
    with_ckpt = plan_round(shape, "sft", Setup(cuda=False, activation_checkpointing=True), batches)
    without = plan_round(shape, "sft", Setup(cuda=False), batches)
    assert with_ckpt.total < without.total
    gib = with_ckpt.total * 1.001 / GIB
    registry = CollectorRegistry()
    with caplog.at_level(logging.ERROR, logger="trainer.rounds"):
        run(config(MemoryConfig(device_memory_gib=gib, headroom=1.0)), registry=registry,
            serve_metrics=False)  # fmt: skip
    assert (
        registry.get_sample_value(
            "rlhf_trainer_rounds_total", {"type": "sft", "outcome": "refused"}
        )
        == 1
    )
    assert checkpoint.list_versions(tmp_path / "registry", "policy") == []
    refusal = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusal and "it fits with --memory.activation-checkpointing true" in refusal[0]

    run(config(MemoryConfig(device_memory_gib=gib, headroom=1.0, activation_checkpointing=True)),
        registry=CollectorRegistry(), serve_metrics=False)  # fmt: skip
    versions = checkpoint.list_versions(tmp_path / "registry", "policy")
    assert len(versions) == 1
    assert (
        checkpoint.verify(tmp_path / "registry" / "policy" / versions[0]).metrics["examples"] == 8
    )
