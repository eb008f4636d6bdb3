"""How every gRPC call is handled before and after its servicer: authenticate, parse, measure.
The key check (``check_key``), the call metrics (``CallMetrics``, by protocol) and the error a
request path raises (``CallError``) are shared with the HTTP doors (``rlhf/http.py``).

The runtime installs one ``CallInterceptor`` per server. For each call it

1. checks the API key and its scope from the call's metadata alone: a caller without a valid
   key gets ``UNAUTHENTICATED`` (a key without the scope ``PERMISSION_DENIED``) before any
   byte of the request body is parsed;
2. parses the request body itself (the servicer's handler is registered without a
   deserializer): a body that is not a valid message of the method's request type gets
   ``INVALID_ARGUMENT`` naming the type, never ``UNKNOWN``; for client streams every message
   is parsed as it is read;
3. counts and times the call by method and final status code.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rlhf.auth import KeyStore, Scope, presented_key

# Probes and tooling must work without a key; they reveal nothing but liveness and the API shape.
PUBLIC_SERVICES = (
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
)

# Request latency buckets from 1 ms (metadata-only calls) to 2 minutes (long generations).
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)


class CallError(Exception):
    """A call refused or failed with a gRPC status; the gRPC door aborts with it and the HTTP
    door renders it as an error body with the matching HTTP status (``rlhf/http.py``)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_key(keys: KeyStore, scope: Scope, presented: str | None) -> CallError | None:
    """Why a call needing ``scope`` is refused (over gRPC or HTTP), or None when it may run."""
    if not keys.enabled:
        return None
    if presented is None:
        return CallError(
            grpc.StatusCode.UNAUTHENTICATED, "missing API key: send 'authorization: Bearer <key>'"
        )
    granted = keys.lookup(presented)
    if granted is None:
        return CallError(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
    if scope not in granted:
        return CallError(grpc.StatusCode.PERMISSION_DENIED, f"API key lacks scope '{scope.value}'")
    return None


class CallMetrics:
    """Calls by protocol (``grpc``, ``http``), method and final status (a gRPC status name),
    and the health conditions of the services."""

    def __init__(self, registry: CollectorRegistry, component: str) -> None:
        prefix = f"rlhf_{component}"
        self.requests = Counter(
            f"{prefix}_requests_total",
            "Calls handled, by protocol, method and status code",
            ["protocol", "method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            f"{prefix}_request_duration_seconds",
            "Call duration from receipt to the last response byte, by protocol, method and status",
            ["protocol", "method", "code"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{prefix}_requests_in_flight",
            "Calls being handled, by protocol and method",
            ["protocol", "method"],
            registry=registry,
        )
        self.conditions = Gauge(
            f"{prefix}_health_condition",
            "1 while a condition a service needs to serve holds (model loaded, Kafka reachable, "
            "a topic tail running...), else 0; the service is SERVING only while all are 1",
            ["service", "condition"],
            registry=registry,
        )

    def started(self, protocol: str, method: str) -> float:
        self.in_flight.labels(protocol, method).inc()
        return time.perf_counter()

    def finished(self, protocol: str, method: str, code: str, start: float) -> None:
        self.requests.labels(protocol, method, code).inc()
        self.duration.labels(protocol, method, code).observe(time.perf_counter() - start)
        self.in_flight.labels(protocol, method).dec()


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates each call, then times it and counts it by final status code."""

    def __init__(self, keys: KeyStore, scopes: Mapping[str, Scope], metrics: CallMetrics) -> None:
        self._keys = keys
        self._scopes = scopes
        self._metrics = metrics

    def _required_scope(self, method: str) -> Scope | None:
        """None for public services; unknown services need ``admin`` (deny by default)."""
        service = method.lstrip("/").split("/", 1)[0]
        if service in PUBLIC_SERVICES:
            return None
        return self._scopes.get(method, self._scopes.get(service, Scope.ADMIN))

    def _check(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        scope = self._required_scope(method)
        if scope is None:
            return None
        denial = check_key(self._keys, scope, presented_key(metadata))
        return None if denial is None else (denial.code, denial.message)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        denial = self._check(method, details.invocation_metadata)
        return _wrap(handler, method.lstrip("/"), denial, self._metrics)


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN.name
    return grpc.StatusCode.OK.name


Parse = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]


def _parser(deserialize: Callable[[bytes], Any] | None, method: str) -> Parse:
    """Parses one request message; a malformed body aborts the call with INVALID_ARGUMENT."""

    async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError, or anything else a bad body can raise
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request body is not a valid {_request_type(deserialize, method)} message "
                f"({type(exc).__name__})",
            )

    return parse


def _request_type(deserialize: Callable[[bytes], Any], method: str) -> str:
    owner = getattr(deserialize, "__self__", None)  # Message.FromString is a classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", f"request message of {method}")


async def _parsed_stream(
    raw_messages: AsyncIterator[bytes], parse: Parse, context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    async for raw in raw_messages:
        yield await parse(raw, context)


def _wrap(
    handler: grpc.RpcMethodHandler,
    method: str,
    denial: tuple[grpc.StatusCode, str] | None,
    metrics: CallMetrics,
) -> grpc.RpcMethodHandler:
    """The same handler, refusing the call when ``denial`` is set, parsing requests only
    after that, and recording metrics. The returned handler receives raw request bytes."""
    parse = _parser(handler.request_deserializer, method)
    client_stream = bool(handler.stream_unary or handler.stream_stream)

    def record(
        context: grpc.aio.ServicerContext, start: float, error: BaseException | None
    ) -> None:
        metrics.finished("grpc", method, _final_code(context, error), start)

    async def request_of(raw: Any, context: grpc.aio.ServicerContext) -> Any:
        if denial is not None:
            await context.abort(*denial)  # before a byte of the body is parsed
        if client_stream:
            return _parsed_stream(raw, parse, context)
        return await parse(raw, context)

    def unary_response(behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def call(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            start = metrics.started("grpc", method)
            error: BaseException | None = None
            try:
                return await behavior(await request_of(raw, context), context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                record(context, start, error)

        return call

    def stream_response(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def call(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = metrics.started("grpc", method)
            error: BaseException | None = None
            try:
                result = behavior(await request_of(raw, context), context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write()
                    await result
            except BaseException as exc:
                error = exc
                raise
            finally:
                record(context, start, error)

        return call

    kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), **kwargs)
