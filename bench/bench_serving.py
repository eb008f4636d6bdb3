"""Serving benchmark: the policy server over gRPC vs plain ``model.generate``, in one run.

    PYTHONPATH=. python bench/bench_serving.py                      # tiny model, CPU
    PYTHONPATH=. python bench/bench_serving.py --size 0.5b --device cuda --dtype bfloat16

Starts ``rlhf serve policy`` as a subprocess on a model built from config (or --model-path),
then drives it with an asyncio gRPC client at each concurrency level (closed loop: each of
``c`` workers sends its next request when the previous one returned) and reports output
tokens/s and p50/p99 request latency. The baseline is the same model in this process answering
the first of the same requests one at a time with ``model.generate`` (same sampling settings,
same max_new_tokens). The per-request gRPC overhead is the p50 latency of max_new_tokens=1
requests over gRPC minus the p50 of the same one-token ``generate`` in process. On CUDA it
also reports the memory-bandwidth bound of single-stream decoding (weights read once per token).

The last line printed is one JSON object: {"bench": "serving", ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from rlhf.kafka_local import free_port
from rlhf.models import build_tiny, load_policy
from rlhf.v1 import inference_pb2, inference_pb2_grpc

# Peak memory bandwidth (GB/s) by device name, for the decode roofline.
BANDWIDTH_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0}


def prompts(count: int) -> list[str]:
    topics = ["the sea", "a red fox", "compilers", "bread", "the moon", "old maps", "rain", "chess"]
    return [
        f"Request {i}: write a few words about {topics[i % len(topics)]}." for i in range(count)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def baseline(
    model_path: Path, texts: list[str], args: argparse.Namespace, max_new_tokens: int
) -> dict:
    """One request at a time through plain ``model.generate``."""
    device = torch.device(args.device)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tok = load_policy(model_path, device, dtype)
    latencies, tokens = [], 0
    start = time.perf_counter()
    for i, text in enumerate(texts):
        ids = tok(text, return_tensors="pt")["input_ids"].to(device)
        torch.manual_seed(i)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(  # type: ignore[operator]
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=args.temperature,
                top_p=args.top_p,
                pad_token_id=tok.pad_token_id,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        latencies.append(time.perf_counter() - t0)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return {
        "requests": len(texts),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "weight_bytes": weight_bytes,
    }


async def drive(
    port: int, texts: list[str], concurrency: int, args: argparse.Namespace, max_new_tokens: int
) -> dict:
    """Closed-loop load: ``concurrency`` workers share the request list."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        queue = list(enumerate(texts))
        latencies: list[float] = []
        tokens = 0

        async def worker() -> None:
            nonlocal tokens
            while queue:
                i, text = queue.pop(0)
                params = inference_pb2.GenerationParameters(
                    do_sample=True, temperature=args.temperature, top_p=args.top_p,
                    max_new_tokens=max_new_tokens, seed=i,
                )  # fmt: skip
                t0 = time.perf_counter()
                reply = await stub.Generate(
                    inference_pb2.GenerateRequest(prompt=text, parameters=params), timeout=600
                )
                latencies.append(time.perf_counter() - t0)
                tokens += sum(s.generated_tokens for s in reply.samples)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(texts),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
    }


def start_server(model_path: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "rlhf", "serve", "policy",
        "--model.path", str(model_path), "--model.device", args.device, "--model.dtype", args.dtype,
        "--runtime.host", "127.0.0.1", "--runtime.port", str(port), "--runtime.metrics-port", "-1",
        "--engine.max-batch-size", str(args.max_batch_size), "--engine.torch-threads", str(args.threads),
        "--limits.max-new-tokens", str(max(args.max_new_tokens, 1)),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


async def wait_ready(port: int, timeout_s: float) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", help="model directory (default: build one with --size)")
    parser.add_argument(
        "--size", default="tiny", help="rlhf.models size when building: tiny, small, 0.5b"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    # One thread each: on a small shared machine, OpenMP threads waiting on a descheduled
    # sibling slow both the server and the baseline by up to 10x, and make runs incomparable.
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for server and baseline"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests-per-worker", type=int, default=3)
    parser.add_argument("--baseline-requests", type=int, default=12)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model_path = (
            Path(args.model_path)
            if args.model_path
            else build_tiny(Path(tmp) / "policy", seed=0, size=args.size)
        )
        port = free_port()
        server = start_server(model_path, port, args)
        try:
            asyncio.run(wait_ready(port, 300))
            # Warm-up: first calls pay allocator and kernel set-up.
            asyncio.run(drive(port, prompts(4), 4, args, 8))
            results = {}
            for c in levels:
                texts = prompts(max(c * args.requests_per_worker, 8))
                results[f"c{c}"] = asyncio.run(drive(port, texts, c, args, args.max_new_tokens))
                print(json.dumps(results[f"c{c}"]), flush=True)
            one_token = asyncio.run(drive(port, prompts(40), 1, args, 1))
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        # The baseline runs with the server gone, so it has the machine to itself.
        base = baseline(model_path, prompts(args.baseline_requests), args, args.max_new_tokens)
        print(json.dumps({"baseline": base}), flush=True)
        base_one = baseline(model_path, prompts(40), args, 1)

    top = results[f"c{max(levels)}"]
    report: dict = {
        "bench": "serving",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "model_size": args.size if not args.model_path else args.model_path,
        "weights_mb": round(base["weight_bytes"] / 2**20, 1),
        "max_new_tokens": args.max_new_tokens,
        "baseline_tokens_per_s": round(base["tokens_per_s"], 1),
        "baseline_p50_s": round(base["p50_s"], 4),
        "baseline_p99_s": round(base["p99_s"], 4),
    }
    for key, r in results.items():
        report[f"{key}_tokens_per_s"] = round(r["tokens_per_s"], 1)
        report[f"{key}_p50_s"] = round(r["p50_s"], 4)
        report[f"{key}_p99_s"] = round(r["p99_s"], 4)
    report[f"speedup_c{max(levels)}"] = round(top["tokens_per_s"] / base["tokens_per_s"], 2)
    report["grpc_1token_p50_ms"] = round(one_token["p50_s"] * 1000, 2)
    report["generate_1token_p50_ms"] = round(base_one["p50_s"] * 1000, 2)
    report["grpc_overhead_p50_ms"] = round((one_token["p50_s"] - base_one["p50_s"]) * 1000, 2)
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        bandwidth = next((bw for key, bw in BANDWIDTH_GBS.items() if key in name), None)
        if bandwidth:
            bound = bandwidth * 1e9 / base["weight_bytes"]
            report["bandwidth_gbs"] = bandwidth
            report["single_stream_bound_tokens_per_s"] = round(bound, 1)
            report["c1_fraction_of_bound"] = round(
                results.get("c1", top)["tokens_per_s"] / bound, 3
            )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
