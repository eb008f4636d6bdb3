"""The feedback gateway's HTTP/JSON API (scope ``feedback``), beside ``FeedbackService``.

Bodies are the gRPC request messages in protobuf's JSON mapping (field names as in
``feedback.proto``, lowerCamelCase also accepted; unknown fields and wrong types are a 400
naming the field), and they run the gateway's own path: the same validation, generation-id
resolution, PII redaction, idempotency and ack-after-Kafka as ``SubmitComparison``:

* ``POST /v1/feedback/comparisons``: a ``ComparisonRequest`` -> ``{"event_id", "duplicate"}``;
* ``POST /v1/feedback/demonstrations``: a ``DemonstrationRequest`` -> the same ack;
* ``POST /v1/feedback/bulk``: ``{"items": [{"comparison": {...}} | {"demonstration": {...}}]}``
  -> a ``BulkResponse``, as ``SubmitBulk``: the whole body is parsed and checked against the
  bulk limits first (a malformed or oversized body stores nothing), then every item is
  validated, stored and acked on its own;
* ``GET /health``: 200 while the gateway serves, 503 otherwise (no key).

An ``Idempotency-Key`` header may stand in for the body's ``idempotency_key``. Errors are
Google's JSON error, ``{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": ...}}``
with the HTTP status matching the gRPC one (400, 401, 403, 404, 413, 503).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web

from rlhf.http import HttpDoor, HttpError, invalid, json_response
from rlhf.http_json import parse_proto, proto_json, read_json
from rlhf.runtime import Scope
from rlhf.v1 import feedback_pb2
from services.feedback.config import LimitsConfig
from services.feedback.gateway import FeedbackGateway, Submitted

if TYPE_CHECKING:
    from services.feedback.server import FeedbackServicer

SERVICE = "rlhf.v1.FeedbackService"


def _idempotency_key(http: web.Request, message: Any) -> None:
    header = http.headers.get("idempotency-key")
    if header is None:
        return
    if message.idempotency_key and message.idempotency_key != header:
        raise invalid("the Idempotency-Key header and idempotency_key in the body differ")
    message.idempotency_key = header


def _ack(result: Submitted) -> dict[str, Any]:
    return {"event_id": result.event_id, "duplicate": result.duplicate}


class FeedbackRoutes:
    def __init__(
        self, gateway: FeedbackGateway, servicer: FeedbackServicer, limits: LimitsConfig
    ) -> None:
        self._gateway = gateway
        self._servicer = servicer
        self._limits = limits

    async def comparison(self, http: web.Request) -> web.Response:
        request = parse_proto(await read_json(http), feedback_pb2.ComparisonRequest())
        _idempotency_key(http, request)
        return json_response(_ack(await self._gateway.submit_comparison(request)))

    async def demonstration(self, http: web.Request) -> web.Response:
        request = parse_proto(await read_json(http), feedback_pb2.DemonstrationRequest())
        _idempotency_key(http, request)
        return json_response(_ack(await self._gateway.submit_demonstration(request)))

    async def bulk(self, http: web.Request) -> web.Response:
        body = await read_json(http)
        unknown = sorted(set(body) - {"items"})
        if unknown:
            raise invalid(f"unknown field {unknown[0]!r}; a bulk body is {{'items': [...]}}")
        raw = body.get("items")
        if not isinstance(raw, list):
            raise invalid(
                "items: expected an array of {'comparison': ...} or {'demonstration': ...}"
            )
        # Parse everything before storing anything: a bad body is refused whole.
        items = [
            parse_proto(item, feedback_pb2.FeedbackItem(), f"items[{i}]: ")
            for i, item in enumerate(raw)
        ]
        limits = self._limits
        if (
            len(items) > limits.max_bulk_items
            or sum(i.ByteSize() for i in items) > limits.max_bulk_bytes
        ):
            raise HttpError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a bulk holds at most {limits.max_bulk_items} items and {limits.max_bulk_bytes} "
                "bytes; nothing of it was stored, send it in smaller parts",
                status=413,
            )
        return json_response(proto_json(await self._servicer.store_all(items)))


def add_routes(
    door: HttpDoor, gateway: FeedbackGateway, servicer: FeedbackServicer, limits: LimitsConfig
) -> None:
    routes = FeedbackRoutes(gateway, servicer, limits)
    door.route("POST", "/v1/feedback/comparisons", routes.comparison, scope=Scope.FEEDBACK)
    door.route("POST", "/v1/feedback/demonstrations", routes.demonstration, scope=Scope.FEEDBACK)
    door.route("POST", "/v1/feedback/bulk", routes.bulk, scope=Scope.FEEDBACK)
    door.health("/health", [SERVICE])
