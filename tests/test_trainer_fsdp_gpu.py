"""One PPO-ptx round of the 0.5b shape with FSDP2 on one GPU (bf16 gathers over fp32 master
weights), its peak memory against the memory plan; a frozen model offloaded to host memory.
Deselected where torch sees no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf import models
from trainer.config import GatesConfig, PPOConfig, TrainerConfig
from trainer.corpus import PretrainCorpus
from trainer.distributed import Dist, DistributedConfig
from trainer.plan import Batches, Shape, plan_round, setup_of
from trainer.ppo_round import run_ppo_round
from trainer.round import RoundContext
from trainer.simulator import corpus_sentences, make_prompts

CORPUS = Path(__file__).resolve().parents[1] / "data" / "pretrain.txt"


@pytest.mark.gpu
def test_fsdp2_ppo_round_of_the_05b_shape_stays_within_the_plan(tmp_path):
    models.init_models(models.InitConfig(out=str(tmp_path / "base"), size="0.5b", tokenizer="bpe"))
    cfg = TrainerConfig(
        registry=tmp_path / "registry", base_model=tmp_path / "base", pretrain_corpus=CORPUS,
        device="cuda", progress="off", distributed=DistributedConfig(fsdp="on"),
        gates=GatesConfig(enabled=False, eval_prompts=16, eval_ptx_examples=8),
        ppo=PPOConfig(episodes=32, minibatch_size=16, iterations=1, max_new_tokens=32),
    )  # fmt: skip
    dist = Dist.start(cfg.distributed, "cuda")
    try:
        assert dist.sharded and dist.world == 1
        spec = cfg.encoding.resolve(models.load_tokenizer(tmp_path / "base" / "policy"))
        prompts = make_prompts(corpus_sentences(CORPUS), 48, seed=0)
        torch.cuda.reset_peak_memory_stats()
        ctx = RoundContext(cfg, PretrainCorpus(CORPUS), dist.device, "ppo", spec,
                           torch.bfloat16, dist=dist)  # fmt: skip
        candidate = run_ppo_round(ctx, prompts[:32], val_prompts=prompts[32:])
        peak = torch.cuda.max_memory_allocated()
        out = tmp_path / "published"
        candidate.save(out)
        models.load_policy(out, "cuda")
    finally:
        dist.close()
    shape = Shape.from_dir(tmp_path / "base" / "policy")
    setup = setup_of(cfg, gpus=1, sharded=True, cuda=True)
    plan = plan_round(shape, "ppo", setup, Batches.of(cfg))
    weights = sum(v for k, v in plan.lines.items() if "activations" not in k)
    print(f"peak {peak / 2**30:.2f} GiB, plan {plan.total / 2**30:.2f} GiB "
          f"(weights, gradients, AdamW {weights / 2**30:.2f} GiB)")  # fmt: skip
    assert weights <= peak <= plan.total * 1.1


@pytest.mark.gpu
def test_offloaded_frozen_models_keep_their_shards_in_host_memory(tmp_path, monkeypatch):
    """``distributed.offload_frozen``: a frozen model's shards stay in host memory (FSDP2's
    CPUOffloadPolicy), nothing of it stays on the GPU between passes, and it computes what
    the whole model on the GPU does (bf16 gathers: within bf16's precision)."""
    from rlhf.kafka_local import free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    models.init_models(models.InitConfig(out=str(tmp_path / "base")))
    dist = Dist.start(DistributedConfig(fsdp="on", offload_frozen=True), "cuda")
    try:
        whole, _ = models.load_policy(tmp_path / "base" / "policy", dist.device, torch.float32)
        frozen, _ = models.load_policy(tmp_path / "base" / "policy", "cpu", torch.float32)
        frozen.requires_grad_(False)
        before = torch.cuda.memory_allocated()
        frozen = dist.shard(frozen, trainable=False)
        assert torch.cuda.memory_allocated() == before  # nothing of it moved to the GPU
        assert all(p.to_local().device.type == "cpu" for p in frozen.parameters())
        ids = torch.randint(3, 100, (2, 16), device=dist.device)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            got = frozen(input_ids=ids, attention_mask=mask).logits.float()
            with models.autocast(dist.device):
                want = whole(input_ids=ids, attention_mask=mask).logits.float()
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
        dist.reshard(frozen)
        assert all(p.to_local().device.type == "cpu" for p in frozen.parameters())
    finally:
        dist.close()
