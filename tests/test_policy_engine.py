"""The batching engine on tiny real models: what it generates must be what the model says,
whatever else shares the batch."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from rlhf.models import build_tiny, load_policy
from services.policy.engine import FinishReason, GenerationFailed, QueueFull, SampleDone
from services.policy.engines.native import LoadedPolicy
from services.policy.engines.native import NativeEngine as Engine
from services.policy.sampling import Detokenizer, Sampler, SamplingParams


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedPolicy, LoadedPolicy]:
    root = tmp_path_factory.mktemp("models")
    out = []
    for seed in (0, 1):
        model, tok = load_policy(build_tiny(root / f"v{seed}", seed=seed))
        out.append(LoadedPolicy.of(model, tok, f"v{seed}"))
    return out[0], out[1]


def ids(policy: LoadedPolicy, text: str) -> list[int]:
    return list(policy.tokenizer(text)["input_ids"])


def teacher_forced_logprobs(
    policy: LoadedPolicy, prompt: list[int], tokens: tuple[int, ...]
) -> torch.Tensor:
    """log p(token_t | prompt, tokens_<t) from one plain forward pass without any cache."""
    full = torch.tensor([prompt + list(tokens)])
    with torch.inference_mode():
        logits = (
            policy.model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0].float()
        )
    logprobs = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(tokens))
    return logprobs[positions, torch.tensor(tokens)]


def run(coro):
    return asyncio.run(coro)


async def _generate(
    engine: Engine, policy: LoadedPolicy, prompt: str, params: SamplingParams, n: int = 1
):
    return await engine.submit(policy, ids(policy, prompt), params, n).result()


def test_concurrent_requests_match_the_model(policies) -> None:
    """Requests of different lengths join a running batch mid-flight; every token's reported
    logprob equals the plain model's on the same prefix, so caches were joined, padded and
    trimmed correctly. Two policy versions decode side by side."""
    v0, v1 = policies
    engine = Engine(CollectorRegistry(), max_batch_size=16)
    cases = [
        (v0, "a", SamplingParams(max_new_tokens=24), 1),
        (
            v0,
            "the quick brown fox jumps over",
            SamplingParams(do_sample=True, seed=1, max_new_tokens=16),
            3,
        ),
        (
            v1,
            "hello there",
            SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, seed=2, max_new_tokens=20),
            2,
        ),
        (
            v0,
            "xyz",
            SamplingParams(
                do_sample=True, top_k=5, repetition_penalty=1.3, seed=3, max_new_tokens=8
            ),
            1,
        ),
        (
            v1,
            "a much longer prompt than all the others in this batch",
            SamplingParams(max_new_tokens=12),
            2,
        ),
    ]

    async def main():
        gens = []
        for policy, prompt, params, n in cases:
            gens.append(engine.submit(policy, ids(policy, prompt), params, n))
            await asyncio.sleep(0.005)  # lets the earlier requests start decoding first
        return [await g.result() for g in gens]

    try:
        results = run(main())
    finally:
        engine.stop()
    for (policy, prompt, params, n), samples in zip(cases, results, strict=True):
        assert [s.index for s in samples] == list(range(n))
        for s in samples:
            assert s.finish_reason is FinishReason.LENGTH
            assert len(s.token_ids) == params.max_new_tokens
            want = teacher_forced_logprobs(policy, ids(policy, prompt), s.token_ids)
            torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-4, rtol=1e-4)
            assert s.text == policy.tokenizer.decode(s.token_ids, skip_special_tokens=True)
    # Greedy decoding picks the model's argmax at every step.
    greedy = results[0][0]
    lp = teacher_forced_logprobs(v0, ids(v0, "a"), greedy.token_ids)
    full = torch.tensor([ids(v0, "a") + list(greedy.token_ids)])
    with torch.inference_mode():
        argmax = v0.model(input_ids=full).logits[0, :-1].argmax(-1)[len(ids(v0, "a")) - 1 :]
    assert argmax.tolist() == list(greedy.token_ids)
    assert lp.shape[0] == 24
    # n samples of one seeded request differ from each other.
    assert len({s.token_ids for s in results[1]}) == 3


def test_seed_reproduces_whatever_shares_the_batch(policies) -> None:
    v0, _ = policies
    params = SamplingParams(do_sample=True, temperature=1.0, seed=1234, max_new_tokens=16)
    engine = Engine(CollectorRegistry(), max_batch_size=16)

    async def alone():
        return await _generate(engine, v0, "seeded prompt", params, n=2)

    async def crowded():
        others = [
            engine.submit(
                v0,
                ids(v0, f"other prompt {i} " * (i + 1)),
                SamplingParams(do_sample=True, max_new_tokens=20),
            )
            for i in range(4)
        ]
        mine = engine.submit(v0, ids(v0, "seeded prompt"), params, 2)
        result = await mine.result()
        for g in others:
            await g.result()
        return result

    try:
        first, second = run(alone()), run(crowded())
        other_seed = run(
            _generate(engine, v0, "seeded prompt", dataclasses.replace(params, seed=99), n=2)
        )
    finally:
        engine.stop()
    assert [s.token_ids for s in first] == [s.token_ids for s in second]
    assert [s.token_ids for s in first] != [s.token_ids for s in other_seed]


def test_finish_reasons_eos_and_stop(policies) -> None:
    v0, _ = policies
    engine = Engine(CollectorRegistry())
    try:
        free = run(_generate(engine, v0, "stop here", SamplingParams(max_new_tokens=12)))[0]
        # Declaring the model's first greedy token an end-of-sequence token ends the sample
        # there: the token is kept (training sees the end), the text is empty.
        eos_policy = dataclasses.replace(v0, eos_token_ids=frozenset({free.token_ids[2]}))
        ended = run(_generate(engine, eos_policy, "stop here", SamplingParams(max_new_tokens=12)))[
            0
        ]
        stop = free.text[1:3]
        stopped = run(
            _generate(engine, v0, "stop here", SamplingParams(max_new_tokens=12, stop=(stop,)))
        )[0]
    finally:
        engine.stop()
    assert free.finish_reason is FinishReason.LENGTH
    assert ended.finish_reason is FinishReason.EOS_TOKEN
    assert ended.token_ids == free.token_ids[: len(ended.token_ids)]
    assert ended.token_ids[-1] == free.token_ids[2]
    assert ended.text == v0.tokenizer.decode(ended.token_ids[:-1], skip_special_tokens=True)
    assert stopped.finish_reason is FinishReason.STOP_SEQUENCE
    assert stopped.text.endswith(stop) and stop not in stopped.text[:-1]
    assert len(stopped.token_ids) < 12


def test_cancel_and_deadline_stop_generation(policies) -> None:
    v0, _ = policies
    engine = Engine(CollectorRegistry())
    long = SamplingParams(max_new_tokens=1500)  # greedy: this model never picks EOS

    async def cancel_after_first_token() -> None:
        gen = engine.submit(v0, ids(v0, "cancel me"), long, 2, stream=True)
        async for _ in gen.events():
            break
        gen.cancel()

    async def expire() -> list[SampleDone]:
        gen = engine.submit(v0, ids(v0, "too slow"), long, 1, deadline=time.monotonic() + 0.2)
        return await gen.result()

    try:
        run(cancel_after_first_token())
        assert engine.wait_idle(10)
        with pytest.raises(GenerationFailed) as failed:
            run(expire())
        assert failed.value.reason == "deadline"
        assert engine.wait_idle(10)
        # Neither request ran to its max_new_tokens (3 samples x 1500 tokens).
        assert engine.metrics.generated._value.get() < 1500
        assert engine.metrics.aborted.labels("cancelled")._value.get() == 1
        assert engine.metrics.aborted.labels("deadline")._value.get() == 1
    finally:
        engine.stop()


def test_queue_bound(policies) -> None:
    v0, _ = policies
    engine = Engine(CollectorRegistry(), max_batch_size=1, max_queue=2)

    async def main():
        long = SamplingParams(max_new_tokens=1500)
        first = engine.submit(v0, ids(v0, "q"), long, stream=True)
        async for _ in first.events():
            break  # it runs now and holds the only batch slot
        queued = [engine.submit(v0, ids(v0, "q"), long) for _ in range(2)]
        with pytest.raises(QueueFull):
            engine.submit(v0, ids(v0, "q"), long)
        for g in [first, *queued]:
            g.cancel()

    try:
        run(main())
        assert engine.wait_idle(10)
    finally:
        engine.stop()


def test_sampler_truncation_and_penalty() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    sampler = Sampler(slots=4, vocab=4, max_new_tokens=8, device=torch.device("cpu"))
    sampler.start(0, SamplingParams(do_sample=True, top_k=1), seed=0, context=[])
    sampler.start(2, SamplingParams(do_sample=True, top_p=0.01), seed=1, context=[])
    # Repetition penalty 4 turns token 1's logit 3 into 0.75, below token 3's 2.
    sampler.start(3, SamplingParams(repetition_penalty=4.0), seed=2, context=[1])
    tokens, logprobs = sampler.select(logits, [0, 2, 3])
    assert tokens == [1, 1, 3]
    expected = torch.log_softmax(logits[0], dim=-1)
    assert logprobs == pytest.approx([expected[1].item(), expected[1].item(), expected[3].item()])
    # The chosen token is now seen too: the next step penalises token 3 as well (2 -> 0.5).
    assert sampler.select(logits[:1], [3])[0] == [2]


def test_sampler_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    """Greedy, sampled and penalised rows alike: the chosen token's logprob under the
    unprocessed distribution, as torch.logsumexp gives it."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4096, generator=gen) * 4
    sampler = Sampler(slots=6, vocab=4096, max_new_tokens=8, device=torch.device("cpu"))
    for slot in range(6):
        params = [
            SamplingParams(),
            SamplingParams(do_sample=True, temperature=0.7),
            SamplingParams(do_sample=True, top_k=5, top_p=0.9),
            SamplingParams(repetition_penalty=1.3),
            SamplingParams(do_sample=True, repetition_penalty=1.3),
            SamplingParams(),
        ][slot]
        context = logits[slot].topk(3).indices.tolist()  # the penalty lowers the top tokens
        sampler.start(slot, params, seed=slot, context=context)
    tokens, logprobs = sampler.select(logits, list(range(6)))
    expected = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0] - torch.logsumexp(logits, -1)
    assert logprobs == pytest.approx(expected.tolist(), rel=1e-6, abs=1e-6)
    assert [tokens[0], tokens[5]] == [int(logits[0].argmax()), int(logits[5].argmax())]
    assert tokens[3] != int(logits[3].argmax())  # the penalised greedy row took another token
    # A step of greedy rows only (its own shorter path).
    greedy = Sampler(slots=6, vocab=4096, max_new_tokens=8, device=torch.device("cpu"))
    for slot in range(6):
        greedy.start(slot, SamplingParams(), seed=slot, context=[])
    tokens, logprobs = greedy.select(logits, list(range(6)))
    assert tokens == logits.argmax(-1).tolist()
    expected = logits.amax(-1) - torch.logsumexp(logits, -1)
    assert logprobs == pytest.approx(expected.tolist(), rel=1e-6, abs=1e-6)


def test_detokenizer_holds_back_split_characters(policies) -> None:
    v0, _ = policies
    text = "né 🙂"
    detok = Detokenizer(v0.tokenizer)
    deltas = [detok.push(t) for t in v0.tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert "".join(deltas) == text
    assert "\ufffd" not in "".join(deltas)
    assert deltas[1] == "" and deltas[2] == "é"  # 'é' is two bytes


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits[0], dim=-1)
    draws = 4000
    sampler = Sampler(slots=2, vocab=4, max_new_tokens=draws, device=torch.device("cpu"))
    sampler.start(0, SamplingParams(do_sample=True, max_new_tokens=draws), seed=0, context=[])
    sampler.start(
        1, SamplingParams(do_sample=True, top_k=2, max_new_tokens=draws), seed=1, context=[]
    )
    counts = torch.zeros(4)
    truncated = torch.zeros(4)
    for _ in range(draws):
        full, top2 = sampler.select(logits.expand(2, 4), [0, 1])[0]
        counts[full] += 1
        truncated[top2] += 1
    torch.testing.assert_close(counts / draws, probs, atol=0.03, rtol=0)
    assert truncated[2:].sum() == 0  # outside top_k: never drawn
    want = probs[:2] / probs[:2].sum()
    torch.testing.assert_close(truncated[:2] / draws, want, atol=0.03, rtol=0)


def test_streamed_text_equals_final_text_when_a_character_is_cut(policies) -> None:
    """A sample that ends inside a multi-byte UTF-8 character (cut by max_new_tokens, or by an
    EOS token) streams the held-back bytes with its last token: the concatenated stream, the
    per-token texts and the final text are one and the same, whatever the request asked for."""
    v0, _ = policies
    params = SamplingParams(do_sample=True, seed=5, max_new_tokens=200)
    engine = Engine(CollectorRegistry())

    async def stream(policy: LoadedPolicy, p: SamplingParams) -> tuple[str, SampleDone]:
        gen = engine.submit(policy, ids(policy, "cut"), p, stream=True)
        texts, done = [], None
        async for event in gen.events():
            texts.append(event.text)
            done = event.done or done
        assert done is not None
        return "".join(texts), done

    async def result(policy: LoadedPolicy, p: SamplingParams, token_texts: bool) -> SampleDone:
        return (
            await engine.submit(policy, ids(policy, "cut"), p, token_texts=token_texts).result()
        )[0]

    try:
        free = run(_generate(engine, v0, "cut", params))[0]
        # The byte tokenizer's ids are bytes: find a lead byte of a multi-byte character whose
        # next token can stand for an EOS token it never used before.
        tokens = free.token_ids
        k = next(
            i
            for i in range(len(tokens) - 1)
            if 0xC2 <= tokens[i] <= 0xF4 and tokens[i + 1] not in tokens[: i + 1]
        )
        cut = dataclasses.replace(params, max_new_tokens=k + 1)
        eos_policy = dataclasses.replace(v0, eos_token_ids=frozenset({tokens[k + 1]}))
        cases = [(v0, cut, FinishReason.LENGTH), (eos_policy, params, FinishReason.EOS_TOKEN)]
        for policy, p, reason in cases:
            streamed, done = run(stream(policy, p))
            unary = run(result(policy, p, token_texts=True))
            plain = run(result(policy, p, token_texts=False))
            assert done.finish_reason is unary.finish_reason is plain.finish_reason is reason
            assert done.token_ids[k] == tokens[k] and done.text.endswith("\ufffd")
            assert streamed == done.text == "".join(done.token_texts)
            assert unary.text == "".join(unary.token_texts) == plain.text == done.text
    finally:
        engine.stop()
