"""The peers of ``bench_serving.py``, each driven the same way: the same token-id prompts, the
same sampling settings, tokens counted as generated (up to and including an EOS token).

Each driver returns a ``Run``: generated tokens, wall time, per-request latencies and, where the
peer streams, per-request times to first token.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import grpc
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from rlhf.encoding import pad
from rlhf.v1 import inference_pb2, inference_pb2_grpc


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int
    sampled: bool
    temperature: float = 0.8
    top_p: float = 0.95


@dataclass
class Run:
    tokens: int = 0
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    # Decode rows per forward pass, from the native engine's own metric (None: not measured).
    rows: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _closed_loop(items: list, concurrency: int, one) -> float:
    """``concurrency`` workers take the next item when their previous one returned."""
    queue = list(items)

    async def worker() -> None:
        while queue:
            await one(queue.pop(0))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


def _params(s: Settings, seed: int) -> inference_pb2.GenerationParameters:
    if not s.sampled:
        return inference_pb2.GenerationParameters(max_new_tokens=s.max_new_tokens)
    return inference_pb2.GenerationParameters(
        do_sample=True, temperature=s.temperature, top_p=s.top_p,
        max_new_tokens=s.max_new_tokens, seed=seed,
    )  # fmt: skip


def grpc_run(port: int, prompts: list[str], concurrency: int, s: Settings, stream: bool) -> Run:
    """The policy server over gRPC: unary Generate, or GenerateStream to time first tokens."""

    async def main() -> Run:
        run = Run()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            async def one(item: tuple[int, str]) -> None:
                i, text = item
                request = inference_pb2.GenerateRequest(prompt=text, parameters=_params(s, i))
                t0 = time.perf_counter()
                if stream:
                    first = None
                    async for _event in stub.GenerateStream(request, timeout=600):
                        first = first or time.perf_counter()
                        run.tokens += 1
                    run.ttfts.append((first or t0) - t0)
                else:
                    reply = await stub.Generate(request, timeout=600)
                    run.tokens += sum(x.generated_tokens for x in reply.samples)
                run.latencies.append(time.perf_counter() - t0)

            run.wall_s = await _closed_loop(list(enumerate(prompts)), concurrency, one)
        return run

    return asyncio.run(main())


def openai_run(
    url: str, model: str, prompts: list[list[int]], concurrency: int, s: Settings, stream: bool
) -> Run:
    """vLLM's own OpenAI-compatible server, the same token-id prompts."""

    async def main() -> Run:
        run = Run()
        async with aiohttp.ClientSession() as session:

            async def one(item: tuple[int, list[int]]) -> None:
                i, ids = item
                body = {
                    "model": model, "prompt": ids, "max_tokens": s.max_new_tokens,
                    "temperature": s.temperature if s.sampled else 0.0,
                    "top_p": s.top_p if s.sampled else 1.0, "stream": stream,
                    "return_token_ids": True,
                }  # fmt: skip
                if s.sampled:
                    body["seed"] = i
                t0 = time.perf_counter()
                async with session.post(f"{url}/v1/completions", json=body) as reply:
                    reply.raise_for_status()
                    if stream:
                        first = None
                        async for raw in reply.content:
                            line = raw.decode().strip()
                            if not line.startswith("data:") or line.endswith("[DONE]"):
                                continue
                            for choice in json.loads(line[5:])["choices"]:
                                if choice.get("token_ids"):
                                    first = first or time.perf_counter()
                                    run.tokens += len(choice["token_ids"])
                        run.ttfts.append((first or t0) - t0)
                    else:
                        data = await reply.json()
                        run.tokens += sum(len(c["token_ids"]) for c in data["choices"])
                run.latencies.append(time.perf_counter() - t0)

            run.wall_s = await _closed_loop(list(enumerate(prompts)), concurrency, one)
        return run

    return asyncio.run(main())


def _generated(out: torch.Tensor, prompt_len: int, eos: int) -> list[int]:
    """Tokens each row generated, up to and including its first EOS."""
    rows = out[:, prompt_len:].tolist()
    return [next((i + 1 for i, t in enumerate(row) if t == eos), len(row)) for row in rows]


def static_run(model, tok, prompts: list[list[int]], batch: int, s: Settings) -> Run:
    """``model.generate`` on left-padded batches of ``batch`` prompts, one batch at a time.

    A request's latency is its batch's duration; its time to first token is the same batch
    generating one token (prefill + first step), measured separately.
    """
    device = next(model.parameters()).device
    run = Run()
    kwargs = dict(do_sample=s.sampled, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if s.sampled:
        kwargs |= dict(temperature=s.temperature, top_p=s.top_p)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(prompts), batch):
            ids, mask = pad(prompts[b : b + batch], tok.pad_token_id, side="left")
            ids, mask = ids.to(device), mask.to(device)
            torch.manual_seed(b)
            t0 = time.perf_counter()
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=s.max_new_tokens, **kwargs
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - t0
            counts = _generated(out, ids.shape[1], tok.eos_token_id)
            run.tokens += sum(counts)
            run.latencies += [took] * ids.shape[0]
    run.wall_s = time.perf_counter() - start
    with torch.inference_mode():
        for b in range(0, len(prompts), batch):
            ids, mask = pad(prompts[b : b + batch], tok.pad_token_id, side="left")
            t0 = time.perf_counter()
            model.generate(
                ids.to(device), attention_mask=mask.to(device), max_new_tokens=1, **kwargs
            )
            run.ttfts += [time.perf_counter() - t0] * ids.shape[0]
    return run


def hf_continuous_run(model, tok, prompts: list[list[int]], s: Settings) -> Run:
    """transformers' own continuous batching (``generate_batch``), all prompts at once."""
    config = GenerationConfig(
        max_new_tokens=s.max_new_tokens, do_sample=s.sampled,
        temperature=s.temperature if s.sampled else 1.0, top_p=s.top_p if s.sampled else 1.0,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    # Sized for these requests: left to itself it takes 90 % of free memory for its cache.
    longest = max(len(p) for p in prompts) + s.max_new_tokens
    sizing = ContinuousBatchingConfig(
        num_blocks=len(prompts) * (longest // 256 + 1) + 8, max_batch_tokens=2048
    )
    start = time.perf_counter()
    outputs = model.generate_batch(
        inputs=prompts,
        generation_config=config,
        continuous_batching_config=sizing,
        progress_bar=False,
    )
    wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return Run(tokens=tokens, wall_s=wall, latencies=[wall] * len(prompts))
