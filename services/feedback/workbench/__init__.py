"""The labelers' workbench: a K-way ranking page served by the feedback gateway.

routes.py   the HTTP API under /v1/workbench/ and the page at /workbench/ (static/)
tasks.py    the labeling queue's tasks: from served traffic, leased, labeled
queue.py    which task comes next (newest, or the reward model's least certain), and
            tasks generated on demand by the policy server
ledger.py   tasks per labeler today and inter-labeler agreement
metrics.py  throughput, queue depth, time per task and agreement for the dashboard
config.py   ``workbench.*`` settings

``add_workbench`` wires them into a running gateway: one Kafka tail reads ``rlhf.prompts``
(tasks), ``rlhf.comparisons`` and ``rlhf.demonstrations`` (labels, agreement) from the
beginning and keeps following them; submissions go through the gateway's own pipeline.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from rlhf import bus, topics
from rlhf.http import HttpDoor
from rlhf.pii import Redactor
from rlhf.runtime import ServerRuntime
from rlhf.v1 import events_pb2
from services.feedback.config import GatewayConfig
from services.feedback.gateway import FeedbackGateway
from services.feedback.tail import TopicTail
from services.feedback.workbench.config import WorkbenchConfig
from services.feedback.workbench.ledger import Ledger
from services.feedback.workbench.metrics import WorkbenchMetrics
from services.feedback.workbench.queue import LabelingQueue, Upstream
from services.feedback.workbench.routes import WorkbenchRoutes, task_of_key
from services.feedback.workbench.tasks import TaskPool


class Feed:
    """Routes the tail's records: served generations become tasks, events become labels."""

    def __init__(self, pool: TaskPool, ledger: Ledger) -> None:
        self._pool = pool
        self._ledger = ledger

    def __call__(self, record: bus.Record) -> None:
        value = record.value
        if isinstance(value, events_pb2.ServedGeneration):
            self._pool.add_generation(value, record.timestamp_ms)
        elif isinstance(value, events_pb2.ComparisonEvent):
            self._ledger.add_comparison(value)
            self._pool.labeled(
                value.labeler_id,
                task_id=task_of_key(value.idempotency_key) or "",
                generation_ids=[r.generation_id for r in value.responses if r.generation_id],
            )
        elif isinstance(value, events_pb2.DemonstrationEvent):
            self._ledger.add_demonstration(value)
            task_id = task_of_key(value.idempotency_key)
            if task_id:
                self._pool.labeled(value.labeler_id, task_id=task_id)


def add_workbench(
    door: HttpDoor,
    runtime: ServerRuntime,
    gateway: FeedbackGateway,
    config: WorkbenchConfig,
    gateway_config: GatewayConfig,
    registry: CollectorRegistry,
) -> None:
    """Serves the workbench on ``door``; its tail and clients stop with the runtime."""
    if config.lookback_s > gateway_config.resolver.ttl_s:
        raise ValueError(
            f"workbench.lookback_s ({config.lookback_s:g}) exceeds resolver.ttl_s "
            f"({gateway_config.resolver.ttl_s:g}): tasks would cite expired generations"
        )
    metrics = WorkbenchMetrics(registry)
    pool = TaskPool(
        min_k=config.min_k,
        overlap=config.overlap,
        lookback_s=config.lookback_s,
        lease_s=config.lease_s,
        max_tasks=config.max_tasks,
        on_added=lambda source: metrics.tasks_added.labels(source).inc(),
    )
    ledger = Ledger(window_days=config.agreement_window_days, max_prompts=config.max_tasks * 4)
    metrics.watch(pool, ledger)
    kafka = gateway_config.kafka
    tail = TopicTail(
        kafka.bootstrap_servers,
        [topics.PROMPTS, topics.COMPARISONS, topics.DEMONSTRATIONS],
        Feed(pool, ledger),
        client_id=f"{kafka.client_id}-workbench",
        registry=registry,  # restarts counted; the gateway's health does not depend on it
    )
    upstream = Upstream(config)
    queue = LabelingQueue(config, pool, upstream, Redactor(gateway_config.policy.pii_kinds))
    routes = WorkbenchRoutes(
        config,
        gateway_config.limits,
        gateway,
        pool,
        queue,
        ledger,
        metrics,
        ready=lambda: tail.wait_caught_up(0),
    )
    routes.add_to(door)
    tail.start()
    runtime.on_stop(lambda: asyncio.to_thread(tail.stop))
    runtime.on_stop(upstream.close)
