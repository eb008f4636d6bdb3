"""``rlhf serve feedback``: the FeedbackService gRPC server (auth scope ``feedback``).

The servicer only converts between protos and the gateway's calls; validation, the data
policy and exactly-once storage live in ``gateway.py``. The HTTP/JSON door (``http.py``) runs
the same gateway calls and the same bulk path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry

from rlhf.config import option, parse_config
from rlhf.http import HttpDoor, Style
from rlhf.runtime import AddServicers, RuntimeConfig, Scope, ServerRuntime
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc
from services.feedback import http
from services.feedback.config import GatewayConfig, LimitsConfig
from services.feedback.gateway import FeedbackGateway, Submitted, open_gateway
from services.feedback.validate import Rejection
from services.feedback.workbench import add_workbench
from services.feedback.workbench.config import WorkbenchConfig

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
    http_port: int = option(8003, "HTTP/JSON feedback API port (0 picks a free port, -1 disables)")


@dataclass(frozen=True)
class FeedbackServerConfig(GatewayConfig):
    runtime: FeedbackRuntimeConfig = field(
        default_factory=FeedbackRuntimeConfig,
        metadata={"help": "gRPC and HTTP servers, auth and metrics"},
    )
    startup_timeout_s: float = option(
        60.0,
        "while Kafka is unreachable at start, a warning is logged this often; the gateway "
        "serves health (NOT_SERVING) meanwhile and keeps retrying",
    )
    workbench: WorkbenchConfig = field(
        default_factory=WorkbenchConfig,
        metadata={"help": "the labelers' workbench page on the HTTP port"},
    )


def _ack(result: Submitted) -> feedback_pb2.SubmitAck:
    return feedback_pb2.SubmitAck(event_id=result.event_id, duplicate=result.duplicate)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, gateway: FeedbackGateway, limits: LimitsConfig) -> None:
        self._gateway = gateway
        self._limits = limits

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
        """All or nothing up to the end of the stream, then item by item: items are held
        until the client's stream ends cleanly, so a stream that fails (an item over the
        message size limit, a cancelled call, a broken connection) stores nothing. Then every
        item is validated and stored on its own and acked in ``BulkResponse.items``; one bad
        item does not fail the others. If the call fails after that (its deadline, the
        connection), resending the same items is safe: stored ones come back duplicate."""
        limits = self._limits
        items: list[feedback_pb2.FeedbackItem] = []
        held = 0
        async for item in request_iterator:
            held += item.ByteSize()
            if len(items) >= limits.max_bulk_items or held > limits.max_bulk_bytes:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"a bulk stream holds at most {limits.max_bulk_items} items and "
                    f"{limits.max_bulk_bytes} bytes; nothing of this stream was stored, send it "
                    "in smaller streams",
                )
            items.append(item)
        # The loop above also ends (without an error) when gRPC itself ends the stream, e.g.
        # on an item over the message size limit. Sending the response headers succeeds only
        # on a call the client half-closed and still waits on; on a broken call it raises
        # (the call is cancelled), so nothing below runs and nothing is stored.
        await context.send_initial_metadata(())
        return await self.store_all(items)

    async def store_all(
        self, items: Sequence[feedback_pb2.FeedbackItem]
    ) -> feedback_pb2.BulkResponse:
        """Validates and stores every item of a whole bulk on its own (both doors)."""
        slots = asyncio.Semaphore(BULK_CONCURRENCY)

        async def one(index: int, item: feedback_pb2.FeedbackItem) -> feedback_pb2.ItemAck:
            async with slots:
                return await self._item(index, item)

        acks = await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
        accepted = sum(1 for a in acks if a.code == 0)
        return feedback_pb2.BulkResponse(
            items=acks, accepted=accepted, rejected=len(acks) - accepted
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
            warn_after_s=config.startup_timeout_s,
            on_condition=lambda name, ok, detail: runtime.set_condition(FEEDBACK, name, ok, detail),
        )
        runtime.on_stop(lambda: asyncio.to_thread(app.close))
        servicer = FeedbackServicer(app.gateway, config.limits)
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(servicer, server)
        door = HttpDoor(runtime, style=Style.GOOGLE)
        http.add_routes(door, app.gateway, servicer, config.limits)
        if config.workbench.enabled:
            add_workbench(door, runtime, app.gateway, config.workbench, config, registry)

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
