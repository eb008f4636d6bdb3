"""The GenerationEngine protocol's behaviour, the same tests on every engine: the native one
(always) and vLLM (``make test-vllm``: its own environment, a server process per version).

Seeds, stop strings, cancellation, n samples, logprobs against teacher forcing, streamed text
== final text, and a hot swap under 16 concurrent gRPC streams with no failed request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from rlhf import checkpoint, models
from rlhf.config import load_config
from rlhf.v1 import inference_pb2, inference_pb2_grpc
from services.policy.config import PolicyServerConfig, VLLMConfig
from services.policy.engine import (
    EngineStopped,
    FinishReason,
    GenerationEngine,
    GenerationFailed,
    Policy,
    SampleDone,
)
from services.policy.engines.native import NativeEngine
from services.policy.engines.worker import WorkerEngine
from services.policy.sampling import SamplingParams
from services.policy.server import PolicyServer

# (engine, size, model family). vLLM's CPU attention needs head_dim >= 32: the byte family's
# "small" has 32, its "tiny" 16. The BPE family is a Qwen2 with grouped-query attention.
ENGINES = [
    pytest.param(("native", "tiny", "byte"), id="native"),
    pytest.param(("native", "tiny", "bpe"), id="native-bpe"),
    pytest.param(("worker", "tiny", "bpe"), id="native-worker-process"),
    pytest.param(("vllm", "small", "byte"), id="vllm", marks=pytest.mark.vllm),
]
VLLM_TEST_CONFIG = VLLMConfig(threads=1, cpu_kv_cache_gb=1)


@pytest.fixture(scope="module", params=ENGINES)
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GenerationEngine, Policy, Path, CollectorRegistry]]:
    kind, size, family = request.param
    registry = CollectorRegistry()
    path = models.build_tiny(
        tmp_path_factory.mktemp(kind) / "policy", seed=0, size=size, tokenizer=family
    )
    engine: GenerationEngine
    if kind == "vllm":
        from services.policy.engines.vllm import VLLMEngine

        engine = VLLMEngine(registry, VLLM_TEST_CONFIG, max_seq_len=512)
    elif kind == "worker":
        engine = WorkerEngine(registry, max_batch_size=16, max_seq_len=512, torch_threads=1)
    else:
        engine = NativeEngine(registry, max_batch_size=16, max_seq_len=512)
    policy = engine.load(path, "v0")
    engine.warm_up(policy)
    yield engine, policy, path, registry
    engine.stop()
    engine.unload(policy)


def ids(policy: Policy, text: str) -> list[int]:
    return list(policy.tokenizer(text)["input_ids"])


def generate(
    engine: GenerationEngine, policy: Policy, prompt: str, params: SamplingParams, n: int = 1
) -> list[SampleDone]:
    async def main() -> list[SampleDone]:
        return await engine.submit(policy, ids(policy, prompt), params, n).result()

    return asyncio.run(main())


def stream(
    engine: GenerationEngine, policy: Policy, prompt: str, params: SamplingParams
) -> tuple[str, SampleDone]:
    async def main() -> tuple[str, SampleDone]:
        texts, done = [], None
        async for event in engine.submit(policy, ids(policy, prompt), params, stream=True).events():
            texts.append(event.text)
            done = event.done or done
        assert done is not None
        return "".join(texts), done

    return asyncio.run(main())


def test_n_samples_and_logprobs_match_teacher_forcing(setup) -> None:
    engine, policy, path, _ = setup
    model, _ = models.load_policy(path)
    prompt = "the quick brown fox"
    samples = generate(
        engine, policy, prompt, SamplingParams(do_sample=True, seed=1, max_new_tokens=16), n=3
    )
    assert [s.index for s in samples] == [0, 1, 2]
    assert len({s.token_ids for s in samples}) == 3  # n samples differ from each other
    for s in samples:
        full = torch.tensor([ids(policy, prompt) + list(s.token_ids)])
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(input_ids=full).logits[0].float(), dim=-1)
        start = len(ids(policy, prompt)) - 1
        want = logprobs[torch.arange(start, start + len(s.token_ids)), torch.tensor(s.token_ids)]
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=2e-3, rtol=1e-3)
    greedy = generate(engine, policy, prompt, SamplingParams(max_new_tokens=8))[0]
    full = torch.tensor([ids(policy, prompt) + list(greedy.token_ids)])
    with torch.inference_mode():
        argmax = model(input_ids=full).logits[0, :-1].argmax(-1)[len(ids(policy, prompt)) - 1 :]
    assert argmax.tolist() == list(greedy.token_ids)


def test_seed_reproduces_whatever_runs_beside_it(setup) -> None:
    engine, policy, _, _ = setup
    params = SamplingParams(
        do_sample=True, temperature=0.9, top_p=0.95, seed=1234, max_new_tokens=12
    )

    async def crowded() -> list[SampleDone]:
        others = [
            engine.submit(
                policy,
                ids(policy, f"other {i} " * (i + 1)),
                SamplingParams(do_sample=True, max_new_tokens=16),
            )
            for i in range(4)
        ]
        mine = await engine.submit(policy, ids(policy, "seeded"), params, 2).result()
        for other in others:
            await other.result()
        return mine

    alone = generate(engine, policy, "seeded", params, n=2)
    again = asyncio.run(crowded())
    other_seed = generate(engine, policy, "seeded", dataclasses.replace(params, seed=7), n=2)
    assert [s.token_ids for s in alone] == [s.token_ids for s in again]
    assert [s.token_ids for s in alone] != [s.token_ids for s in other_seed]


def test_stop_strings_and_streamed_text_equal_final_text(setup) -> None:
    engine, policy, _, _ = setup
    params = SamplingParams(do_sample=True, seed=5, max_new_tokens=60)
    free = generate(engine, policy, "cut", params)[0]
    stop = free.text[5:7]
    streamed, stopped = stream(engine, policy, "cut", dataclasses.replace(params, stop=(stop,)))
    assert stopped.finish_reason is FinishReason.STOP_SEQUENCE
    assert stopped.text.endswith(stop) and stop not in stopped.text[:-1]
    assert streamed == stopped.text == "".join(stopped.token_texts)
    if len(policy.tokenizer) > 300:
        return  # the cut below needs the byte tokenizer, whose ids are bytes
    # A sample cut inside a multi-byte character (byte tokenizer: ids are bytes) streams the
    # held-back bytes with its last token.
    k = next(i for i, t in enumerate(free.token_ids) if 0xC2 <= t <= 0xF4)
    streamed, cut = stream(engine, policy, "cut", dataclasses.replace(params, max_new_tokens=k + 1))
    assert cut.token_ids == free.token_ids[: k + 1]
    assert cut.text.endswith("\ufffd") and streamed == cut.text == "".join(cut.token_texts)


def test_cancellation_stops_generation(setup) -> None:
    engine, policy, _, registry = setup

    def cancelled() -> float:
        return (
            registry.get_sample_value("rlhf_policy_requests_aborted_total", {"reason": "cancelled"})
            or 0
        )

    before = cancelled()

    async def cancel_after_first_token() -> None:
        gen = engine.submit(
            policy, ids(policy, "cancel me"), SamplingParams(max_new_tokens=400), 2, stream=True
        )
        async for _ in gen.events():
            break
        gen.cancel()

    asyncio.run(cancel_after_first_token())
    assert engine.wait_idle(30)
    assert cancelled() == before + 1
    if engine.kind == "vllm":
        # vLLM aborted the request too: nothing left running in its process.
        url = policy.url  # type: ignore[attr-defined]
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
                metrics = reply.read().decode()
            running = [
                line
                for line in metrics.splitlines()
                if line.startswith("vllm:num_requests_running")
            ]
            if running and all(line.rstrip().endswith(" 0.0") for line in running):
                break
            assert time.monotonic() < deadline, running
            time.sleep(0.2)
    else:
        assert engine.stats().running == 0


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("native"),
        pytest.param("worker", id="native-worker-process"),
        pytest.param("vllm", marks=pytest.mark.vllm),
    ],
)
def test_hot_swap_under_16_streams_fails_nothing(kind: str, tmp_path: Path) -> None:
    """A registry-following server swaps v1 -> v2 while 16 clients stream without pause."""
    size = "small" if kind == "vllm" else "tiny"
    registry = tmp_path / "registry"
    sources = [models.build_tiny(tmp_path / f"m{seed}", seed=seed, size=size) for seed in (0, 1)]
    first = checkpoint.publish(
        registry, "policy", sources[0], round_type="sft", parent="", metrics={}, offsets={}
    )
    flags = {
        "model.registry": str(registry), "engine.kind": "native" if kind == "worker" else kind,
        "engine.worker_process": str(kind == "worker").lower(), "engine.max_batch_size": "16",
        "follow.poll_registry_s": "0.5", "follow.registry_grace_s": "0",
        "runtime.host": "127.0.0.1", "runtime.port": "0", "runtime.metrics_port": "-1",
        "runtime.http_port": "-1",
        "limits.max_input_tokens": "128", "limits.max_new_tokens": "64",
    }  # fmt: skip
    if kind == "vllm":
        flags |= {"vllm.threads": "1", "vllm.cpu_kv_cache_gb": "1"}
    server = PolicyServer(load_config(PolicyServerConfig, flags=flags), CollectorRegistry())
    server.start_in_thread(ready_timeout_s=600)
    stop = threading.Event()
    seen: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.runtime.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            while not stop.is_set():
                request = inference_pb2.GenerateRequest(
                    prompt=f"client {i}",
                    parameters=inference_pb2.GenerationParameters(
                        max_new_tokens=8, do_sample=True, seed=i
                    ),
                )
                try:
                    versions = {e.model_version for e in stub.GenerateStream(request, timeout=120)}
                    with lock:
                        seen.extend(versions)
                except grpc.RpcError as exc:
                    with lock:
                        errors.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(16)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(seen) < 32:
            assert time.monotonic() < deadline, errors
            time.sleep(0.1)
        second = checkpoint.publish(
            registry,
            "policy",
            sources[1],
            round_type="ppo",
            parent=first.version,
            metrics={},
            offsets={},
        )
        deadline = time.monotonic() + 600
        while True:
            with lock:
                after = seen.count(second.version)
            if after >= 32:
                break
            assert time.monotonic() < deadline, errors
            time.sleep(0.2)
        # The old version was released after its last request, and its memory (or process) with it.
        deadline = time.monotonic() + 120
        while server.pool.resident() != [second.version]:
            assert time.monotonic() < deadline, server.pool.resident()
            time.sleep(0.2)
        assert server.engine.stats().versions == (second.version,)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
        server.stop_in_thread()
    assert errors == []
    assert first.version in seen and second.version in seen


def test_worker_process_that_dies_fails_its_requests(tmp_path: Path) -> None:
    """The engine's worker process killed mid-generation: its running request fails with reason
    "stopped" (no hang, no lost event), and the engine refuses new requests as stopped."""
    path = models.build_tiny(tmp_path / "policy", seed=0)
    engine = WorkerEngine(CollectorRegistry(), max_batch_size=4, max_seq_len=512)
    try:
        policy = engine.load(path, "v0")
        engine.warm_up(policy)

        async def main() -> tuple[int, str]:
            gen = engine.submit(
                policy, ids(policy, "long"), SamplingParams(max_new_tokens=400), stream=True
            )
            seen = 0
            try:
                async for _ in gen.events():
                    seen += 1
                    if seen == 3:
                        engine.process.kill()
            except GenerationFailed as exc:
                return seen, exc.reason
            return seen, "finished"

        seen, reason = asyncio.run(main())
        assert reason == "stopped" and 3 <= seen < 400
        with pytest.raises(EngineStopped):
            asyncio.run(_submit_one(engine, policy))
        assert engine.stats().running == 0
    finally:
        engine.stop()


async def _submit_one(engine: GenerationEngine, policy: Policy) -> None:
    engine.submit(policy, ids(policy, "x"), SamplingParams(max_new_tokens=2))


@pytest.mark.vllm
def test_vllm_openmp_threads_run_on_the_engine_cpus(tmp_path: Path) -> None:
    """``--engine.cpus`` on vLLM's CPU build: its OpenMP threads are bound to those CPUs
    (``VLLM_CPU_OMP_THREADS_BIND``), and it still answers."""
    from services.policy.engines.vllm import VLLMEngine

    cpu = max(os.sched_getaffinity(0))
    path = models.build_tiny(tmp_path / "policy", seed=0, size="small", tokenizer="byte")
    engine = VLLMEngine(
        CollectorRegistry(), VLLM_TEST_CONFIG, max_seq_len=512, cpus=frozenset({cpu})
    )
    policy = engine.load(path, "v0")
    try:
        engine.warm_up(policy)
        assert f"VLLM_CPU_OMP_THREADS_BIND='{cpu}'" in policy.log_path.read_text()
        pinned = [
            tid for pid in _descendants(policy.process.pid) for tid in _threads(pid)
            if _affinity(tid) == {cpu}
        ]  # fmt: skip
        assert pinned, "no thread of vLLM's processes is bound to the engine's CPU"
        gen = asyncio.run(_generate_one(engine, policy))
        assert gen and gen[0].token_ids
    finally:
        engine.stop()
        engine.unload(policy)


async def _generate_one(engine: GenerationEngine, policy: Policy) -> list:
    gen = engine.submit(policy, ids(policy, "bound"), SamplingParams(max_new_tokens=4))
    return await gen.result()


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        here = todo.pop()
        found.append(here)
        try:
            tasks = os.listdir(f"/proc/{here}/task")
            todo += [
                int(child)
                for task in tasks
                for child in Path(f"/proc/{here}/task/{task}/children").read_text().split()
            ]
        except FileNotFoundError:
            continue  # ended meanwhile
    return found


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def _affinity(tid: int) -> set[int]:
    try:
        return os.sched_getaffinity(tid)
    except ProcessLookupError:
        return set()
