"""LoRA rounds against a real broker: an SFT and a PPO-ptx round train adapters and publish
merged weights (equal to peft's own ``merge_and_unload``) that load like any checkpoint; the
PPO-ptx round's reference is its policy with the adapters off, not a copy (counted in
parameters); the adapters carry the lineage to the next round."""

from __future__ import annotations

import uuid

import torch

from rlhf import bus, checkpoint, models
from rlhf.streams import StreamsConfig
from tests.test_trainer_lineage import weights
from tests.trainer_support import CORPUS, Process, produce
from trainer import lora, ppo_models
from trainer import registry as registry_lib
from trainer import state as state_lib
from trainer.config import DataConfig, GatesConfig, PPOConfig, SFTConfig, TrainerConfig
from trainer.corpus import PretrainCorpus
from trainer.plan import Shape
from trainer.reader import StreamTopics
from trainer.round import RoundContext


def count(*modules: object) -> int:
    """Parameters of the distinct tensors the modules hold between them."""
    seen: dict[int, int] = {}
    for module in modules:
        if isinstance(module, torch.nn.Module):
            seen |= {id(p): p.numel() for p in module.parameters()}
    return sum(seen.values())


def test_lora_rounds_publish_merged_weights_and_the_reference_is_no_copy(kafka, tmp_path):
    models.init_models(models.InitConfig(out=str(tmp_path / "base")))
    prefix = f"lora-{uuid.uuid4().hex[:6]}."
    topics = StreamTopics.with_prefix(prefix)
    bus.ensure_topics(kafka.bootstrap_servers, [*topics.inputs(), topics.models])
    produce(kafka, topics, demos=8, prompts=16, val=4)
    adapters = lora.LoRAConfig(enabled=True, rank=4, alpha=8.0)
    cfg = TrainerConfig(
        bootstrap_servers=kafka.bootstrap_servers, group_id=prefix, streams=StreamsConfig(topic_prefix=prefix),
        registry=tmp_path / "registry", base_model=tmp_path / "base", pretrain_corpus=CORPUS,
        device="cpu", metrics_port=0, progress="off", data=DataConfig(poll_timeout_s=0.2),
        gates=GatesConfig(enabled=False, eval_prompts=4, eval_ptx_examples=4), lora=adapters,
        sft=SFTConfig(epochs=2, batch_size=4, lr=1e-2),
        ppo=PPOConfig(episodes=8, minibatch_size=4, iterations=1, max_new_tokens=6, ptx_ratio=1,
                      gamma_ptx=1.0, ema_decay=0.0, warmup_iters=0, lr=1e-2),
    )  # fmt: skip
    registry = cfg.registry
    process = Process(cfg, topics, kafka)
    process.read(demos=8, prompts=16)

    # SFT: adapters on the q/k/v/o and MLP projections; the merged weights move there only.
    sft = process.round("sft")
    base, tuned = weights(tmp_path / "base" / "policy"), weights(registry / "policy" / sft.version)
    assert base.keys() == tuned.keys()
    assert torch.equal(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])
    assert torch.equal(base["model.norm.weight"], tuned["model.norm.weight"])
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"],
                           tuned["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip

    # PPO-ptx: published = reference + adapters, merged, exactly as peft merges them.
    ppo1 = process.round("ppo")
    assert ppo1.reference == sft.version
    state = state_lib.load(registry, ppo1.version)
    assert state is not None and state.lora and state.raw_policy is None
    saved = torch.load(state.path / state_lib.POLICY_ADAPTERS)
    shape = Shape.from_dir(tmp_path / "base" / "policy")
    assert sum(v.numel() for v in saved.values()) == shape.lora_params(4, adapters.target_modules)
    peft_model = lora.add_adapters(
        models.load_policy(registry / "policy" / sft.version)[0], adapters
    )
    lora.load_adapters(peft_model, saved)
    merged = peft_model.merge_and_unload().state_dict()
    published = weights(registry / "policy" / ppo1.version)
    assert any(not torch.equal(published[k], tuned[k]) for k in published)
    for key, value in published.items():
        assert torch.allclose(value, merged[key], atol=1e-6), key
    models.load_policy(registry / "policy" / ppo1.version)  # as the servers load it

    # The next round's models: the reference is the policy itself with its adapters off.
    start = registry_lib.policy_dir(registry, cfg.base_model)
    reference_path = registry_lib.reference_of(registry, start, cfg.base_model)
    assert reference_path.name == sft.version
    spec = process.trainer.spec
    ctx = RoundContext(cfg, PretrainCorpus(CORPUS), "cpu", "ppo", spec, torch.float32)
    m = ppo_models.build(ctx, start, reference_path, state_lib.load(registry, start.name))
    assert isinstance(m.reference, lora.AdaptersOff) and m.reference.model is m.policy
    lora_params = shape.lora_params(4, adapters.target_modules)
    # policy base (= reference) + its adapters, value trunk + head + adapters, the RM.
    expected = shape.policy_params() + lora_params + 2 * shape.rm_params() + lora_params
    assert count(m.policy, m.reference, m.value, m.rm) == expected
    with torch.no_grad():  # the reference computes what the SFT checkpoint does
        ids = torch.randint(3, 100, (2, 10))
        ref_logits = m.reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        sft_model = models.load_policy(registry / "policy" / sft.version, "cpu", torch.float32)[0]
        expected_logits = sft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(ref_logits, expected_logits, atol=1e-5)
    # Full fine-tuning would hold the reference as a second copy of the policy.
    full = TrainerConfig(**{**cfg.__dict__, "lora": lora.LoRAConfig()})
    full_ctx = RoundContext(full, PretrainCorpus(CORPUS), "cpu", "ppo", spec, torch.float32)
    f = ppo_models.build(full_ctx, reference_path, reference_path, None)
    assert (
        count(f.policy, f.reference, f.value, f.rm)
        == 2 * shape.policy_params() + 2 * shape.rm_params()
    )

    # The adapters carry on: a second round continues them (and their AdamW state).
    ppo2 = process.round("ppo")
    assert (ppo2.parent, ppo2.reference) == (ppo1.version, sft.version)
    assert checkpoint.verify(registry / state_lib.ROLE / ppo2.version).version == ppo2.version
    assert state_lib.load(registry, ppo2.version).steps == 4  # type: ignore[union-attr]
    process.close()
