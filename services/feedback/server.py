"""``rlhf serve feedback``: the FeedbackService gRPC server (auth scope ``feedback``).

The servicer only converts between protos and the gateway's calls; validation, the data
policy and exactly-once storage live in ``gateway.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry

from rlhf.config import option, parse_config
from rlhf.runtime import AddServicers, RuntimeConfig, Scope, ServerRuntime
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc
from services.feedback.config import GatewayConfig
from services.feedback.gateway import FeedbackGateway, Submitted, open_gateway
from services.feedback.validate import Rejection

log = logging.getLogger(__name__)

FEEDBACK = "rlhf.v1.FeedbackService"
SERVICES = {FEEDBACK: Scope.FEEDBACK}
# Items of one bulk stream processed at once; they share producer batches.
BULK_CONCURRENCY = 64


@dataclass(frozen=True)
class FeedbackRuntimeConfig(RuntimeConfig):
    """The runtime's settings with the feedback gateway's own default ports (a subclass, not
    a ``default_factory`` with other ports, so that ``--help`` shows the ports it uses)."""

    port: int = option(50053, "gRPC port (0 picks a free port)")
    metrics_port: int = option(9103, "Prometheus /metrics port (0 picks a free port, -1 disables)")


@dataclass(frozen=True)
class FeedbackServerConfig(GatewayConfig):
    runtime: FeedbackRuntimeConfig = field(
        default_factory=FeedbackRuntimeConfig,
        metadata={"help": "gRPC server, auth and metrics"},
    )
    startup_timeout_s: float = option(
        120.0, "how long start-up may wait for Kafka to rebuild the dedupe index"
    )


def _ack(result: Submitted) -> feedback_pb2.SubmitAck:
    return feedback_pb2.SubmitAck(event_id=result.event_id, duplicate=result.duplicate)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, gateway: FeedbackGateway) -> None:
        self._gateway = gateway

    async def SubmitComparison(
        self, request: feedback_pb2.ComparisonRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitAck:
        try:
            return _ack(await self._gateway.submit_comparison(request))
        except Rejection as rejection:
            await context.abort(rejection.code, rejection.message)
            raise  # unreachable: abort raises

    async def SubmitDemonstration(
        self, request: feedback_pb2.DemonstrationRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitAck:
        try:
            return _ack(await self._gateway.submit_demonstration(request))
        except Rejection as rejection:
            await context.abort(rejection.code, rejection.message)
            raise

    async def _item(self, index: int, item: feedback_pb2.FeedbackItem) -> feedback_pb2.ItemAck:
        try:
            result = await self._gateway.submit(item)
        except Rejection as rejection:
            return feedback_pb2.ItemAck(
                index=index, code=rejection.code.value[0], message=rejection.message
            )
        return feedback_pb2.ItemAck(index=index, ack=_ack(result))

    async def SubmitBulk(
        self,
        request_iterator: AsyncIterator[feedback_pb2.FeedbackItem],
        context: grpc.aio.ServicerContext,
    ) -> feedback_pb2.BulkResponse:
        slots = asyncio.Semaphore(BULK_CONCURRENCY)
        tasks: list[asyncio.Task[feedback_pb2.ItemAck]] = []
        async for item in request_iterator:
            await slots.acquire()
            task = asyncio.create_task(self._item(len(tasks), item))
            task.add_done_callback(lambda _task: slots.release())
            tasks.append(task)
        items = await asyncio.gather(*tasks)
        accepted = sum(1 for i in items if i.code == 0)
        return feedback_pb2.BulkResponse(
            items=items, accepted=accepted, rejected=len(items) - accepted
        )


def add_servicers(
    config: FeedbackServerConfig, registry: CollectorRegistry, runtime: ServerRuntime
) -> AddServicers:
    """The runtime hook: opens the gateway (Kafka, dedupe index) inside the server's loop."""

    async def add(server: grpc.aio.Server) -> None:
        app = await asyncio.to_thread(
            open_gateway,
            config,
            registry,
            startup_timeout_s=config.startup_timeout_s,
            on_condition=lambda name, ok, detail: runtime.set_condition(FEEDBACK, name, ok, detail),
        )
        runtime.on_stop(lambda: asyncio.to_thread(app.close))
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(
            FeedbackServicer(app.gateway), server
        )

    return add


async def serve(config: FeedbackServerConfig) -> None:
    registry = CollectorRegistry()
    runtime = ServerRuntime(config.runtime, registry, component="feedback")
    await runtime.serve(add_servicers(config, registry, runtime), SERVICES)


def main(argv: list[str]) -> int:
    config = parse_config(
        FeedbackServerConfig,
        argv,
        prog="rlhf serve feedback",
        description="Feedback gateway: K-way rankings and demonstrations into Kafka, exactly once.",
        env_prefix="RLHF_FEEDBACK_",
    )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(config))
    return 0
