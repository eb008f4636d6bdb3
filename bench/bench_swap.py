"""Hot-swap benchmark: how fast a published version reaches users, and what a swap costs them.

A policy server follows a real Kafka broker's models topic while ``--clients`` threads send
requests without pause. After a steady-state window, a new version is published (checkpoint,
then PUBLISHED + PROMOTED events, as the trainer does). Reported, from the same run:

* swap latency: from sending the model events to the first response served by the new version;
* p50/p99 request latency of requests overlapping the swap, next to the steady state's;
* failed requests (must be 0).

    PYTHONPATH=. python bench/bench_swap.py [--size tiny|small|0.5b] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from prometheus_client import CollectorRegistry

from rlhf import bus, checkpoint, models, topics
from rlhf.config import load_config
from rlhf.kafka_local import LocalKafka, free_port
from rlhf.lifecycle import published_events
from rlhf.seed import seed_registry
from rlhf.v1 import inference_pb2, inference_pb2_grpc
from services.policy.config import PolicyServerConfig
from services.policy.server import PolicyServer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steady-s", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        kafka = LocalKafka(tmp / "kafka", port=free_port(), controller_port=free_port())
        kafka.start()
        bus.ensure_topics(kafka.bootstrap_servers)
        producer = bus.Producer(kafka.bootstrap_servers, client_id="bench-swap")
        for seed in (0, 1):
            models.init_models(
                models.InitConfig(out=str(tmp / f"m{seed}"), seed=seed, size=args.size)
            )
        registry = tmp / "registry"
        (first,) = [
            m.version for m in seed_registry(registry, tmp / "m0", producer) if m.role == "policy"
        ]
        config = load_config(
            PolicyServerConfig,
            flags={
                "model.registry": str(registry),
                "model.device": args.device,
                "follow.bootstrap_servers": kafka.bootstrap_servers,
                "runtime.host": "127.0.0.1",
                "runtime.port": "0",
                "runtime.metrics_port": "-1",
                "runtime.http_port": "-1",
            },
        )
        server = PolicyServer(config, CollectorRegistry())
        server.start_in_thread()

        stop = threading.Event()
        lock = threading.Lock()
        done: list[tuple[float, float, str, str]] = []  # (start, end, version, error)

        def client(i: int) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{server.runtime.port}") as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                params = inference_pb2.GenerationParameters(max_new_tokens=args.max_new_tokens)
                while not stop.is_set():
                    started = time.monotonic()
                    version, error = "", ""
                    try:
                        reply = stub.Generate(
                            inference_pb2.GenerateRequest(prompt=f"bench {i}", parameters=params),
                            timeout=120,
                        )
                        version = reply.model_version
                    except grpc.RpcError as exc:
                        error = exc.code().name
                    with lock:
                        done.append((started, time.monotonic(), version, error))

        threads = [
            threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        steady_start = time.monotonic()
        stop.wait(args.steady_s)
        manifest = checkpoint.publish(
            registry, "policy", tmp / "m1" / "policy", round_type="ppo", parent=first,
            metrics={}, offsets={},
        )  # fmt: skip
        published_at = time.monotonic()
        for event in published_events(
            manifest, registry / "policy" / manifest.version, auto_promote=True, actor="bench"
        ):
            producer.send_sync(topics.MODELS, event, key=event.event_id)
        server.pool.wait_resident(manifest.version, 600)
        resident_at = time.monotonic()
        stop.wait(max(2.0, resident_at - published_at))
        stop.set()
        for t in threads:
            t.join(timeout=120)
        server.stop_in_thread()
        producer.close()
        kafka.stop()

    first_new = min((end for _, end, v, _ in done if v == manifest.version), default=float("nan"))
    steady = [
        end - start
        for start, end, _, err in done
        if end < published_at and start >= steady_start and not err
    ]
    during = [
        end - start
        for start, end, _, err in done
        if end >= published_at and start <= resident_at and not err
    ]
    result = {
        "bench": "swap",
        "size": args.size,
        "device": args.device,
        "clients": args.clients,
        "swap_latency_s": round(first_new - published_at, 3),
        "load_verify_warmup_s": round(resident_at - published_at, 3),
        "steady_p50_s": round(statistics.median(steady), 4) if steady else None,
        "steady_p99_s": round(percentile(steady, 0.99), 4),
        "during_swap_p50_s": round(statistics.median(during), 4) if during else None,
        "during_swap_p99_s": round(percentile(during, 0.99), 4),
        "p99_ratio_swap_vs_steady": round(percentile(during, 0.99) / percentile(steady, 0.99), 3),
        "requests": len(done),
        "failed": sum(1 for *_, err in done if err),
    }
    print(
        f"swap latency {result['swap_latency_s']} s; p99 during swap {result['during_swap_p99_s']} s "
        f"vs steady {result['steady_p99_s']} s; failed {result['failed']} of {len(done)}"
    )
    print(json.dumps(result))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
