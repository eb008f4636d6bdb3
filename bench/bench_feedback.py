"""Feedback gateway benchmark: comparisons/s through gRPC into Kafka with acks=all.

Measures, in one run against one broker:

1. raw: kafka-python's idempotent ``acks=all`` producer sending the same ComparisonEvent
   records straight to ``rlhf.comparisons`` (the ceiling for the gateway);
2. throughput: comparisons/s through the gateway (``rlhf serve feedback`` in its own
   process), every one answered only after Kafka acked: unary ``SubmitComparison`` with
   ``--concurrency`` calls in flight over grpc.aio, to one replica and spread over
   ``--replicas`` (one Python process tops out near one core: the scale-out path is more
   replicas), and ``SubmitBulk`` streams to one replica;
3. latency: p50/p99 of the time from sending a comparison until its OK, at a fixed
   ``--rate`` (open loop: requests leave on schedule, whatever the previous ones do).

    PYTHONPATH=. python bench/bench_feedback.py            # starts a local broker
    PYTHONPATH=. python bench/bench_feedback.py --bootstrap-servers host:9092

The last line is one JSON object ``{"bench": "feedback", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaProducer

from rlhf import bus, topics
from rlhf.kafka_local import LocalKafka, free_port
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
K = 4


def make_requests(n: int, run: str, phase: str) -> list[feedback_pb2.ComparisonRequest]:
    """Distinct K=4 comparisons with realistic lengths (prompt ~150, responses ~300 chars)."""
    out = []
    for i in range(n):
        prompt = f"[{run}-{phase}-{i}] Explain how a reward model is trained from rankings. " * 2
        responses = [
            feedback_pb2.ResponseRef(
                text=f"Answer {j} to {i}: the labeler ranks several samples and every ordered "
                f"pair becomes one comparison for the loss. " * 3
            )
            for j in range(K)
        ]
        out.append(
            feedback_pb2.ComparisonRequest(
                prompt=prompt,
                responses=responses,
                ranks=[1, 2, 2, 3],
                labeler_id=f"labeler-{i % 17}",
                user_id=f"user-{i % 101}",
                idempotency_key=f"bench-{run}-{phase}-{i}",
            )
        )
    return out


def as_event(request: feedback_pb2.ComparisonRequest) -> events_pb2.ComparisonEvent:
    return events_pb2.ComparisonEvent(
        event_id=uuid.uuid4().hex,
        created_at_ms=int(time.time() * 1000),
        prompt=request.prompt,
        responses=[
            events_pb2.RankedResponse(text=r.text, rank=rank)
            for r, rank in zip(request.responses, request.ranks, strict=True)
        ],
        labeler_id=request.labeler_id,
        user_id=request.user_id,
        split=events_pb2.SPLIT_TRAIN,
        idempotency_key=request.idempotency_key,
    )


def bench_raw(
    bootstrap: str, requests: list[feedback_pb2.ComparisonRequest], linger_ms: int, batch_size: int
) -> float:
    """Records/s of kafka-python alone, with the gateway's producer settings: send
    everything, then wait for every ack."""
    values = [(as_event(r).SerializeToString(), r.prompt.encode()) for r in requests]
    producer = KafkaProducer(
        bootstrap_servers=bootstrap.split(","),
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        batch_size=batch_size,
        api_version=(4, 0),
    )
    producer.send(topics.COMPARISONS.name, value=values[0][0], key=values[0][1]).get(timeout=30)
    start = time.perf_counter()
    futures = [producer.send(topics.COMPARISONS.name, value=v, key=k) for v, k in values[1:]]
    producer.flush()
    elapsed = time.perf_counter() - start
    assert all(f.succeeded() for f in futures)
    producer.close()
    return (len(values) - 1) / elapsed


async def _submit(
    stub: feedback_pb2_grpc.FeedbackServiceStub, request: feedback_pb2.ComparisonRequest
) -> float:
    start = time.perf_counter()
    ack = await stub.SubmitComparison(request, timeout=30)
    assert not ack.duplicate
    return time.perf_counter() - start


async def bench_throughput(
    addresses: list[str], requests: list[feedback_pb2.ComparisonRequest], concurrency: int
) -> float:
    """Comparisons/s of unary calls, ``concurrency`` in flight, spread over the replicas."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    try:
        stubs = [feedback_pb2_grpc.FeedbackServiceStub(c) for c in channels]
        queue = iter(requests)

        async def worker(stub: feedback_pb2_grpc.FeedbackServiceStub) -> None:
            for request in queue:
                await _submit(stub, request)

        start = time.perf_counter()
        await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
        return len(requests) / (time.perf_counter() - start)
    finally:
        for channel in channels:
            await channel.close()


async def bench_bulk(
    address: str, requests: list[feedback_pb2.ComparisonRequest], streams: int, per_stream: int
) -> float:
    """Comparisons/s through SubmitBulk: ``streams`` client streams at once, each item acked."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        chunks = [requests[i : i + per_stream] for i in range(0, len(requests), per_stream)]
        queue = iter(chunks)

        async def worker() -> None:
            for chunk in queue:
                items = (feedback_pb2.FeedbackItem(comparison=r) for r in chunk)
                reply = await stub.SubmitBulk(items, timeout=60)
                assert reply.accepted == len(chunk), reply.items[0]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        return len(requests) / (time.perf_counter() - start)


async def bench_latency(
    address: str, requests: list[feedback_pb2.ComparisonRequest], rate: float
) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        start = time.perf_counter()
        tasks = []
        for i, request in enumerate(requests):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_submit(stub, request)))
        return sorted(await asyncio.gather(*tasks))


def wait_serving(address: str, timeout_s: float = 120) -> None:
    """Blocks until the gateway reports SERVING (health Watch streams every status change)."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="rlhf.v1.FeedbackService")
        for reply in health.Watch(request, timeout=timeout_s, wait_for_ready=True):
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return


def start_gateway(
    bootstrap: str, linger_ms: int, batch_size: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """``rlhf serve feedback`` in its own process, as deployed (its own GIL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(workdir / "gateway.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "rlhf", "serve", "feedback", "--kafka.bootstrap-servers", bootstrap,
             "--kafka.linger-ms", str(linger_ms), "--kafka.batch-size", str(batch_size), "--runtime.host", "127.0.0.1",
             "--runtime.port", str(port), "--runtime.metrics-port", "-1", "--runtime.http-port", "-1"],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    return server, f"127.0.0.1:{port}"


def crc32c_in_c() -> bool:
    """kafka-python checksums every record batch with CRC-32C, in pure Python unless the
    ``crc32c`` package is installed; that alone changes the numbers several times over."""
    from kafka.record import util

    return util.calc_crc32c.__defaults__ != (util.crc32c_py,)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bootstrap-servers", default="", help="existing broker (default: start one)"
    )
    parser.add_argument(
        "--requests", type=int, default=10_000, help="comparisons for the throughput runs"
    )
    parser.add_argument(
        "--concurrency", type=int, default=128, help="calls in flight in the throughput run"
    )
    parser.add_argument(
        "--rate", type=float, default=500.0, help="comparisons/s of the latency run"
    )
    parser.add_argument(
        "--rate-seconds", type=float, default=10.0, help="length of the latency run"
    )
    parser.add_argument(
        "--replicas", type=int, default=2, help="gateway processes for the scale-out run"
    )
    parser.add_argument("--streams", type=int, default=4, help="SubmitBulk streams at once")
    parser.add_argument(
        "--batch-size", type=int, default=262_144, help="producer batch.size (both)"
    )
    parser.add_argument("--linger-ms", type=int, default=5, help="the gateway producer's linger.ms")
    args = parser.parse_args()

    run = uuid.uuid4().hex[:8]
    if not crc32c_in_c():
        print("note: kafka-python computes CRC-32C in pure Python here (pip install crc32c)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    broker = None
    servers: list[subprocess.Popen[bytes]] = []
    try:
        bootstrap = args.bootstrap_servers
        if not bootstrap:
            broker = LocalKafka(workdir / "kafka", port=free_port(), controller_port=free_port())
            broker.start()
            bootstrap = broker.bootstrap_servers
        bus.ensure_topics(bootstrap)

        raw_rate = bench_raw(
            bootstrap, make_requests(args.requests, run, "raw"), args.linger_ms, args.batch_size
        )
        print(f"raw kafka-python producer (acks=all, idempotent): {raw_rate:,.0f} records/s")

        addresses = []
        for _ in range(args.replicas):
            server, address = start_gateway(bootstrap, args.linger_ms, args.batch_size, workdir)
            servers.append(server)
            addresses.append(address)
        for address in addresses:
            wait_serving(address)
        one = addresses[:1]
        asyncio.run(
            bench_throughput(addresses, make_requests(1000, run, "warmup"), args.concurrency)
        )

        # CPU per comparison does not depend on what else the machine runs; rates do.
        cpu0, client0 = cpu_seconds(servers[0].pid), time.process_time()
        unary_rate = asyncio.run(
            bench_throughput(one, make_requests(args.requests, run, "unary"), args.concurrency)
        )
        unary_cpu_ms = (cpu_seconds(servers[0].pid) - cpu0) * 1000 / args.requests
        client_cpu_ms = (time.process_time() - client0) * 1000 / args.requests
        print(
            f"gateway, unary SubmitComparison, 1 replica ({args.concurrency} in flight): "
            f"{unary_rate:,.0f} comparisons/s"
        )
        replicas_rate = asyncio.run(
            bench_throughput(
                addresses, make_requests(args.requests, run, "replicas"), args.concurrency
            )
        )
        print(
            f"gateway, unary SubmitComparison, {len(addresses)} replicas: "
            f"{replicas_rate:,.0f} comparisons/s"
        )
        cpu0 = cpu_seconds(servers[0].pid)
        bulk_rate = asyncio.run(
            bench_bulk(one[0], make_requests(args.requests, run, "bulk"), args.streams, 500)
        )
        bulk_cpu_ms = (cpu_seconds(servers[0].pid) - cpu0) * 1000 / args.requests
        print(
            f"gateway, SubmitBulk, 1 replica ({args.streams} streams of 500): "
            f"{bulk_rate:,.0f} comparisons/s"
        )
        print(
            f"gateway CPU per comparison: unary {unary_cpu_ms:.3f} ms, bulk {bulk_cpu_ms:.3f} ms "
            f"(client, unary: {client_cpu_ms:.3f} ms)"
        )
        n = int(args.rate * args.rate_seconds)
        latencies = asyncio.run(bench_latency(one[0], make_requests(n, run, "lat"), args.rate))
        p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
        print(
            f"unary at {args.rate:g} comparisons/s: ack latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )
        print(
            f"gateway/raw: unary {unary_rate / raw_rate:.2f}, unary x{len(addresses)} "
            f"{replicas_rate / raw_rate:.2f}, bulk {bulk_rate / raw_rate:.2f}"
        )
        best = max(unary_rate, replicas_rate, bulk_rate)
        result = {
            "bench": "feedback",
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "crc32c_in_c": crc32c_in_c(),
            "k": K,
            "requests": args.requests,
            "raw_records_per_s": round(raw_rate, 1),
            "unary_comparisons_per_s": round(unary_rate, 1),
            "unary_concurrency": args.concurrency,
            "replicas": len(addresses),
            "unary_replicas_comparisons_per_s": round(replicas_rate, 1),
            "bulk_comparisons_per_s": round(bulk_rate, 1),
            "bulk_streams": args.streams,
            "gateway_cpu_ms_per_comparison_unary": round(unary_cpu_ms, 3),
            "gateway_cpu_ms_per_comparison_bulk": round(bulk_cpu_ms, 3),
            "client_cpu_ms_per_comparison_unary": round(client_cpu_ms, 3),
            "gateway_raw_ratio_unary": round(unary_rate / raw_rate, 3),
            "gateway_raw_ratio_unary_replicas": round(replicas_rate / raw_rate, 3),
            "gateway_raw_ratio_bulk": round(bulk_rate / raw_rate, 3),
            "latency_rate_per_s": args.rate,
            "ack_latency_p50_ms": round(p50, 2),
            "ack_latency_p99_ms": round(p99, 2),
            "target_comparisons_per_s": 2000,
            "target_met": best >= 2000,
        }
        print(json.dumps(result))
        return 0
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=60)
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
