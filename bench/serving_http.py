"""The HTTP part of ``bench_serving.py``: the policy server's OpenAI door measured beside its
gRPC door, in the same run, against the same server process and engine.

* ``http_run``: ``POST /v1/completions`` with the same prompts, settings and seeds as the gRPC
  peer, N concurrent clients in a closed loop (tokens from ``usage``; streamed for time to
  first token, which over HTTP is the first chunk with text: a token that ends inside a UTF-8
  character sends none, and the tiny byte-level model samples many);
* ``http_overhead``: what a request costs the HTTP door beyond gRPC: one-token requests, one
  at a time, the two protocols interleaved, median latencies and their difference.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import aiohttp
import grpc
from serving_peers import Run, Settings, _closed_loop

from rlhf.v1 import inference_pb2, inference_pb2_grpc


def _body(text: str, s: Settings, seed: int, stream: bool) -> dict:
    body: dict = {"model": "policy", "prompt": text, "max_tokens": s.max_new_tokens}
    if s.sampled:
        body |= {"temperature": s.temperature, "top_p": s.top_p, "seed": seed}
    else:
        body["temperature"] = 0.0
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def http_run(port: int, prompts: list[str], concurrency: int, s: Settings, stream: bool) -> Run:
    """The policy server's OpenAI API over HTTP/1.1 keep-alive connections (aiohttp)."""

    async def main() -> Run:
        run = Run()
        url = f"http://127.0.0.1:{port}/v1/completions"
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(item: tuple[int, str]) -> None:
                i, text = item
                t0 = time.perf_counter()
                async with session.post(url, json=_body(text, s, i, stream)) as reply:
                    reply.raise_for_status()
                    if stream:
                        first = None
                        async for raw in reply.content:
                            line = raw.decode().strip()
                            if not line.startswith("data:") or line.endswith("[DONE]"):
                                continue
                            chunk = json.loads(line[5:])
                            if chunk.get("usage"):
                                run.tokens += chunk["usage"]["completion_tokens"]
                            elif any(c["text"] for c in chunk["choices"]):
                                first = first or time.perf_counter()
                        run.ttfts.append((first or t0) - t0)
                    else:
                        run.tokens += (await reply.json())["usage"]["completion_tokens"]
                run.latencies.append(time.perf_counter() - t0)

            run.wall_s = await _closed_loop(list(enumerate(prompts)), concurrency, one)
        return run

    return asyncio.run(main())


def http_overhead(grpc_port: int, http_port: int, requests: int = 200) -> dict[str, float]:
    """Median latency of one-token greedy requests over each door, one at a time, interleaved
    in blocks of 10, and HTTP minus gRPC: the per-request cost of the HTTP door."""

    async def main() -> tuple[list[float], list[float]]:
        grpc_lat: list[float] = []
        http_lat: list[float] = []
        params = inference_pb2.GenerationParameters(max_new_tokens=1)
        body = {"model": "policy", "prompt": "hi", "max_tokens": 1, "temperature": 0.0}
        url = f"http://127.0.0.1:{http_port}/v1/completions"
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
            aiohttp.ClientSession() as session,
        ):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for block in range(requests // 10 + 1):  # the first block warms both up
                for _ in range(10):
                    t0 = time.perf_counter()
                    await stub.Generate(
                        inference_pb2.GenerateRequest(prompt="hi", parameters=params), timeout=60
                    )
                    if block:
                        grpc_lat.append(time.perf_counter() - t0)
                for _ in range(10):
                    t0 = time.perf_counter()
                    async with session.post(url, json=body) as reply:
                        reply.raise_for_status()
                        await reply.read()
                    if block:
                        http_lat.append(time.perf_counter() - t0)
        return grpc_lat, http_lat

    grpc_lat, http_lat = asyncio.run(main())
    g, h = statistics.median(grpc_lat), statistics.median(http_lat)
    return {
        "requests_each": len(grpc_lat),
        "grpc_p50_ms": round(g * 1000, 3),
        "http_p50_ms": round(h * 1000, 3),
        "http_minus_grpc_ms": round((h - g) * 1000, 3),
    }
