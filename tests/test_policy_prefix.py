"""The native engine's prefix cache: a prompt that starts like one prefilled before reuses that
prefix's keys and values, and every sample continues exactly as with a fresh prefill; the
cache keeps to its size, never reuses what does not match, and belongs to one version."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from prometheus_client import CollectorRegistry

from rlhf.models import build_tiny, load_policy
from services.policy.engines.native import LoadedPolicy, NativeEngine
from services.policy.kvbatch import Chunk, SlotCache
from services.policy.prefix import PrefixCache, prefix_hashes
from services.policy.sampling import SamplingParams
from tests.test_policy_kv import reference_tokens

SHARED = "a system prompt that many requests start with, long enough to be worth keeping: "


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> LoadedPolicy:
    model, tok = load_policy(build_tiny(tmp_path_factory.mktemp("prefix") / "p", seed=0))
    return LoadedPolicy.of(model, tok, "v0")


def ids(policy: LoadedPolicy, text: str) -> list[int]:
    return list(policy.tokenizer(text)["input_ids"])


Request = tuple[LoadedPolicy, list[int], SamplingParams, int]


def serve(engine: NativeEngine, batches: list[list[Request]]) -> tuple[list, dict]:
    """Each batch submitted at once and awaited before the next (so later ones find the cache);
    returns the samples and each version's prefix cache."""

    async def main():
        out = []
        for batch in batches:
            gens = [engine.submit(p, prompt, params, n) for p, prompt, params, n in batch]
            out.append([await g.result() for g in gens])
        return out

    try:
        results = asyncio.run(main())
        return results, {p.version: b.prefix for p, b in engine._batches.items()}
    finally:
        engine.stop()


def hits(engine: NativeEngine) -> float:
    return engine.metrics.prefix_hit_tokens._value.get()


def test_repeated_and_shared_prompts_reuse_the_cache_and_continue_as_if_prefilled(
    policy: LoadedPolicy,
) -> None:
    """The same prompt again costs one decode row (all but its last token cached), a prompt
    sharing a long start prefills only the rest; greedy, seeded and n > 1 samples give the
    tokens of a full forward pass per token."""
    first = ids(policy, SHARED + "tell me about the sea")
    other = ids(policy, SHARED + "and now about mountains, at some length")
    shared = len(ids(policy, SHARED)) - 1  # the tokenizer may merge across the boundary
    seeded = SamplingParams(do_sample=True, seed=7, max_new_tokens=8, top_p=0.9)
    greedy = SamplingParams(max_new_tokens=8)
    engine = NativeEngine(
        CollectorRegistry(), max_batch_size=8, max_seq_len=256, prefix_cache_tokens=1024
    )
    runs = [
        [(policy, first, greedy, 1)],
        # Again, next to a fresh prompt, with three seeded samples sharing the cached prefix.
        [(policy, first, seeded, 3), (policy, ids(policy, "unrelated"), greedy, 1)],
        [(policy, other, greedy, 1)],
    ]
    steps_before = engine.metrics.forward.labels("prefill")._sum.get()
    results, prefixes = serve(engine, runs)
    assert steps_before == 0
    cache = prefixes["v0"]
    matched = common_prefix(first, other)
    assert matched >= shared >= 16
    # first: nothing cached; its repeat: all but the last token; other: the common start.
    assert hits(engine) == (len(first) - 1) + matched
    # Both kept; "unrelated" is too short to be worth keeping.
    assert cache.tokens == len(first) + len(other)
    for batch, batch_results in zip(runs, results, strict=True):
        for (_, prompt, params, _n), samples in zip(batch, batch_results, strict=True):
            for sample in samples:
                want = reference_tokens(policy, prompt, params, sample.index)
                assert list(sample.token_ids) == want


def common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def test_a_repeated_prompt_is_not_prefilled_again(policy: LoadedPolicy) -> None:
    """Its last token runs as a decode row next to the others: no prefill pass, and the step
    counts one token for it."""
    prompt = ids(policy, SHARED + "once more")
    params = SamplingParams(max_new_tokens=4)
    engine = NativeEngine(
        CollectorRegistry(), max_batch_size=4, max_seq_len=256, prefix_cache_tokens=1024
    )
    (first, again), _ = serve(
        engine, [[(policy, prompt, params, 1)], [(policy, prompt, params, 1)]]
    )
    forward = engine.metrics.forward
    assert forward.labels("prefill")._sum.get() > 0  # the first time
    tokens = engine.metrics.step_tokens._sum.get()
    # First request: its prompt, then 3 decode rows; the repeat: 1 row, then 3.
    assert tokens == len(prompt) + 3 + 1 + 3
    assert first[0][0].token_ids == again[0][0].token_ids


def test_the_cache_keeps_to_its_size_and_evicts_the_least_recently_used(
    policy: LoadedPolicy,
) -> None:
    cache = SlotCache(policy.model, slots=2, capacity=128)
    prefix = PrefixCache(cache, max_tokens=60, min_tokens=4)
    prompts = [[5 + i] * 20 + list(range(30, 40)) for i in range(4)]  # 30 tokens each
    slot = cache.allocate()
    with torch.inference_mode():
        for prompt in prompts:
            cache.release(slot)
            slot = cache.allocate()
            cache.forward([], [], [Chunk(slot, 0, prompt)])
            prefix.store(slot, prompt)
            assert prefix.tokens <= 60
    assert prefix.tokens == 60  # the two newest
    cache.release(slot)
    slot = cache.allocate()
    assert prefix.fill(slot, prompts[0]) == 0  # evicted
    assert prefix.fill(slot, prompts[3] + [1]) == len(prompts[3])
    assert cache.lengths[slot] == len(prompts[3])
    # A prompt longer than the whole cache is not kept; one at most min_tokens is not either.
    prefix.store(slot, list(range(61)))
    prefix.store(slot, [1, 2, 3, 4])
    assert prefix.tokens == 60


def test_a_hash_collision_never_reuses_other_tokens(policy: LoadedPolicy) -> None:
    cache = SlotCache(policy.model, slots=2, capacity=64)
    prefix = PrefixCache(cache, max_tokens=100, min_tokens=2)
    stored = list(range(10, 30))
    with torch.inference_mode():
        slot = cache.allocate()
        cache.forward([], [], [Chunk(slot, 0, stored)])
        prefix.store(slot, stored)
    asked = list(range(40, 60))
    # Every prefix of ``asked`` made to look like a cached one.
    key = next(iter(prefix._entries))
    for h in prefix_hashes(asked):
        prefix._index[h] = key
    other = cache.allocate()
    assert prefix.fill(other, asked) == 0
    assert cache.lengths[other] == 0


def test_a_version_never_reuses_another_versions_keys(
    policy: LoadedPolicy, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two versions side by side (a hot swap): the same prompt on the second is prefilled with
    its own weights and gives its own model's tokens."""
    model, tok = load_policy(build_tiny(tmp_path_factory.mktemp("prefix2") / "p", seed=1))
    second = LoadedPolicy.of(model, tok, "v1")
    prompt = ids(policy, SHARED + "which version am I?")
    params = SamplingParams(max_new_tokens=6)
    engine = NativeEngine(
        CollectorRegistry(), max_batch_size=4, max_seq_len=256, prefix_cache_tokens=1024
    )
    ((a,), (b,), (a2,)), _ = serve(
        engine,
        [
            [(policy, prompt, params, 1)],
            [(second, prompt, params, 1)],
            [(policy, prompt, params, 1)],
        ],
    )
    assert hits(engine) == len(prompt) - 1  # only the first version's repeat
    assert (
        list(a[0].token_ids) == reference_tokens(policy, prompt, params, 0) == list(a2[0].token_ids)
    )
    assert list(b[0].token_ids) == reference_tokens(second, prompt, params, 0)


def test_prefix_cache_off_keeps_nothing(policy: LoadedPolicy) -> None:
    prompt = ids(policy, SHARED + "no cache")
    params = dataclasses.replace(SamplingParams(), max_new_tokens=2)
    engine = NativeEngine(CollectorRegistry(), max_batch_size=2, max_seq_len=256)
    serve(engine, [[(policy, prompt, params, 1)], [(policy, prompt, params, 1)]])
    assert hits(engine) == 0
    assert engine.metrics.step_tokens._sum.get() == 2 * (len(prompt) + 1)
