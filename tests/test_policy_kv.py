"""The native engine's KV memory: written in place (nothing proportional to the cache is
allocated per token), and the same tokens as the engine it replaced (a DynamicCache batcher
with one torch.Generator per sample), prompts prefilled in chunks included."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import Qwen3Config, Qwen3ForCausalLM

from rlhf.models import build_tiny, load_policy
from services.policy.engines.native import LoadedPolicy, NativeEngine
from services.policy.kvbatch import Chunk, SlotCache
from services.policy.sampling import SamplingParams, sample_seed


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> LoadedPolicy:
    model, tok = load_policy(build_tiny(tmp_path_factory.mktemp("kv") / "p", seed=0))
    return LoadedPolicy.of(model, tok, "v0")


def allocated_bytes(fn) -> int:
    """Bytes allocated on the CPU while ``fn`` runs (each allocation counted, frees ignored)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def test_decode_writes_the_cache_in_place_over_512_steps(policy: LoadedPolicy) -> None:
    cache = SlotCache(policy.model, slots=4, capacity=600)
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    slots = [cache.allocate() for _ in range(4)]
    last = [0] * 4
    per_step: list[int] = []
    with torch.inference_mode():
        cache.forward([], [], [Chunk(s, 0, [policy.tokenizer.bos_token_id, 65 + s]) for s in slots])
        for step in range(512):

            def one() -> None:
                logits = cache.forward(slots, last, [])
                last[:] = logits.argmax(-1).tolist()

            if step < 8 or step >= 504:
                per_step.append(allocated_bytes(one))
            else:
                one()
    assert cache.lengths[slots[0]] == 2 + 512
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == (k_ptr, v_ptr)
    early, late = sum(per_step[:8]) / 8, sum(per_step[8:]) / 8
    # Copying the four sequences' KV once per token (what DynamicCache's concatenation did)
    # would allocate this much more per step at ~510 tokens than at ~10.
    copy_per_step = cache.nbytes // cache.slots // cache.capacity * 4 * 500
    assert late - early < copy_per_step / 8, (early, late, copy_per_step)


def reference_tokens(
    policy: LoadedPolicy, prompt: list[int], params: SamplingParams, index: int
) -> list[int]:
    """The replaced engine's algorithm for one sample: a forward pass over the whole sequence
    per token, one ``torch.rand(1)`` per sampled token from the sample's own generator, up to
    EOS."""
    generator = torch.Generator().manual_seed(sample_seed(params.seed or 0, index))
    ids = list(prompt)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(params.max_new_tokens):
            scores = policy.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            if params.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(ids)))
                picked = scores[seen]
                p = params.repetition_penalty
                scores[seen] = torch.where(picked > 0, picked / p, picked * p)
            token = int(scores.argmax())
            if params.do_sample:
                s = scores / params.temperature
                if params.top_k:
                    s = s.masked_fill(s < torch.topk(s, params.top_k).values[-1], float("-inf"))
                if params.top_p < 1:
                    ordered, order = torch.sort(s, descending=True)
                    probs = torch.softmax(ordered, -1)
                    ordered = ordered.masked_fill(
                        probs.cumsum(-1) - probs > params.top_p, float("-inf")
                    )
                    s = torch.empty_like(s).scatter_(0, order, ordered)
                cdf = torch.softmax(s, -1).cumsum(-1)
                u = torch.rand(1, generator=generator)
                token = int(
                    torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=len(cdf) - 1)
                )
            out.append(token)
            ids.append(token)
            if token in policy.eos_token_ids:
                break
    return out


@pytest.fixture(scope="module")
def qwen3(policy: LoadedPolicy) -> LoadedPolicy:
    """A model that runs transformers' own forward with the slot cache as its attention backend
    (Qwen3's query/key norms are not in the lean Llama-family forward)."""
    tok = policy.tokenizer
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return LoadedPolicy.of(Qwen3ForCausalLM(config).eval(), tok, "qwen3")


@pytest.mark.parametrize("family", ["policy", "qwen3"])
def test_same_tokens_as_the_replaced_engine_with_chunked_prefill(
    family: str, request: pytest.FixtureRequest
) -> None:
    """Seeded and greedy requests of every kind, sharing batches, with a step budget small
    enough that the long prompt is prefilled in chunks while the others decode, and prompts of
    equal length prefilled side by side; on the lean forward (Llama) and on transformers' own
    (Qwen3)."""
    policy: LoadedPolicy = request.getfixturevalue(family)
    tok = policy.tokenizer
    base = SamplingParams(do_sample=True, seed=11, max_new_tokens=12)
    cases = [
        ("a long prompt that needs several prefill chunks " * 3, base, 2),
        ("short", dataclasses.replace(base, temperature=0.7, top_p=0.9, seed=3), 1),
        ("top k", dataclasses.replace(base, top_k=5, repetition_penalty=1.3, seed=4), 1),
        ("greedy", SamplingParams(max_new_tokens=12, repetition_penalty=1.2), 1),
        # Prompts of one length are prefilled side by side in one attention call.
        ("equal length A", dataclasses.replace(base, seed=8), 1),
        ("equal length B", SamplingParams(max_new_tokens=12), 1),
    ]
    engine = NativeEngine(
        CollectorRegistry(), max_batch_size=8, max_step_tokens=40, max_seq_len=256
    )

    async def main():
        gens = [
            engine.submit(policy, list(tok(p)["input_ids"]), params, n) for p, params, n in cases
        ]
        return [await g.result() for g in gens]

    try:
        results = asyncio.run(main())
        lean = engine.stats().kv_bytes and engine._batches[policy].cache.lean is not None
    finally:
        engine.stop()
    assert lean == (family == "policy")
    assert len(tok(cases[0][0])["input_ids"]) > 40  # really chunked
    assert engine.metrics.forward.labels("mixed")._sum.get() > 0  # chunks next to decoding rows
    for (prompt, params, _n), samples in zip(cases, results, strict=True):
        for sample in samples:
            want = reference_tokens(policy, list(tok(prompt)["input_ids"]), params, sample.index)
            assert list(sample.token_ids) == want, prompt


@pytest.mark.gpu
def test_decode_memory_is_flat_on_cuda(tmp_path) -> None:
    """On a GPU, 512 decode steps of 32 sequences allocate nothing that stays: the allocator's
    figure after the first step is the figure after the last."""
    model, tok = load_policy(build_tiny(tmp_path / "p", seed=0), torch.device("cuda"))
    cache = SlotCache(model, slots=32, capacity=600)
    slots = [cache.allocate() for _ in range(32)]
    last = [0] * 32
    seen = []
    with torch.inference_mode():
        cache.forward([], [], [Chunk(s, 0, [tok.bos_token_id, 65]) for s in slots])
        for _ in range(512):
            last = cache.forward(slots, last, []).argmax(-1).tolist()
            torch.cuda.synchronize()
            seen.append(torch.cuda.memory_allocated())
    assert max(seen) - min(seen) < cache.nbytes // 100, (min(seen), max(seen))


def test_n_samples_share_one_prefill_of_the_prompt(policy: LoadedPolicy) -> None:
    """A request's n samples run its prompt through the model once (its keys and values are
    then copied into each sample's slot), and each continues exactly as if prefilled alone."""
    prompt = list(policy.tokenizer("a prompt that all four samples continue")["input_ids"])
    params = SamplingParams(do_sample=True, seed=5, max_new_tokens=6)
    engine = NativeEngine(CollectorRegistry(), max_batch_size=8, max_seq_len=128)

    async def main():
        return await engine.submit(policy, prompt, params, n=4).result()

    try:
        samples = asyncio.run(main())
    finally:
        engine.stop()
    # One prefill of the prompt, then each sample's tokens after its first one decoded.
    assert engine.metrics.step_tokens._sum.get() == len(prompt) + 4 * (params.max_new_tokens - 1)
    assert len({s.token_ids for s in samples}) == 4
    for sample in samples:
        assert list(sample.token_ids) == reference_tokens(policy, prompt, params, sample.index)
