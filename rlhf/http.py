"""The HTTP/JSON door a server opens beside its gRPC port, on the same event loop.

A service builds one ``HttpDoor(runtime, style=...)`` while its servicers are added, registers
its routes (``door.route(...)``, each with the scope a key needs) and the runtime does the rest:
the door starts after the gRPC server on ``runtime.http_port`` (``-1`` disables it) and drains
beside it on shutdown. What every route gets from here, so that the service files only convert
JSON to the existing proto requests and back:

* API keys and scopes exactly as over gRPC (``authorization: Bearer KEY`` or ``x-api-key``),
  checked before the body is read; 401 for a missing or unknown key, 403 for a missing scope;
* TLS from the runtime's certificate files (``runtime.tls``), rotated files picked up by new
  connections, client certificates as configured, exactly as on the gRPC port;
* request bodies bounded by ``runtime.max_message_bytes`` (413), JSON parsed with errors that
  say where it broke (400), typed field reads that name the field (``rlhf/http_json.py``);
* errors in the shape the route's clients parse (``Style``): OpenAI's error object, TGI's
  ``{"error", "error_type"}``, or Google's JSON error for the project's own JSON APIs, with the
  HTTP status that matches the call's gRPC status;
* the runtime's request metrics with ``protocol="http"``, ``method`` = the route's path and
  ``code`` = the gRPC status name the response maps to (so one alert covers both doors);
* server-sent events (``EventStream``); a client that disconnects cancels its handler, and
  with it the generation it was waiting for;
* CORS for the origins in ``runtime.http_cors_origins`` (preflight answered without a key).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
from aiohttp import web

from rlhf.auth import presented_key
from rlhf.calls import check_key
from rlhf.runtime import CallError, Scope, ServerRuntime
from rlhf.tls import server_ssl_context

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Set by a handler whose response was already streamed when it failed: the status to record.
CODE = web.RequestKey("rlhf_code", str)
MAX_BODY = web.AppKey("rlhf_max_body_bytes", int)
ALLOWED_HEADERS = "authorization, content-type, x-api-key, idempotency-key, x-request-id"
# Response headers that carry what feedback needs: the version and the generation ids.
MODEL_VERSION_HEADER = "x-rlhf-model-version"
GENERATION_IDS_HEADER = "x-rlhf-generation-ids"
REQUEST_ID_HEADER = "x-rlhf-request-id"
EXPOSED_HEADERS = f"{MODEL_VERSION_HEADER}, {GENERATION_IDS_HEADER}, {REQUEST_ID_HEADER}"


class Style(enum.Enum):
    """Which API's error shape a route speaks."""

    OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}
    TGI = "tgi"  # {"error": "...", "error_type": "validation" | "generation" | ...}
    GOOGLE = "google"  # {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message"}}


# gRPC status -> HTTP status (Google's mapping, as grpc-gateway uses it).
_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# TGI answers validation errors with 422 and failures during generation with 424.
_TGI_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.INTERNAL: 424,
    grpc.StatusCode.DEADLINE_EXCEEDED: 424,
}
# TGI's error types; other statuses (auth, unknown model, not serving) carry no type, so TGI
# clients raise their plain HTTP error with the status instead of an "unknown" TGI error.
_TGI_TYPES = {400: "validation", 413: "validation", 422: "validation", 429: "overloaded"}
_TGI_TYPES |= {424: "generation", 500: "generation", 504: "generation"}
_OPENAI_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}


class HttpError(CallError):
    """A ``CallError`` with what only HTTP has: an explicit status and the offending field."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        error_code: str | None = None,
    ) -> None:
        super().__init__(code, message)
        self.status = status
        self.param = param
        self.error_code = error_code  # OpenAI's machine-readable ``code`` (e.g. model_not_found)


def invalid(message: str, param: str | None = None) -> HttpError:
    return HttpError(grpc.StatusCode.INVALID_ARGUMENT, message, param=param)


def http_status(error: CallError, style: Style) -> int:
    if isinstance(error, HttpError) and error.status is not None:
        return error.status
    if style is Style.TGI and error.code in _TGI_STATUS:
        return _TGI_STATUS[error.code]
    return _STATUS.get(error.code, 500)


def error_body(error: CallError, style: Style) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of ``error`` as the route's clients expect it."""
    status = http_status(error, style)
    if style is Style.TGI:
        kind = _TGI_TYPES.get(status)
        return status, {"error": error.message, **({"error_type": kind} if kind else {})}
    if style is Style.OPENAI:
        param = error.param if isinstance(error, HttpError) else None
        code = error.error_code if isinstance(error, HttpError) else None
        if code is None and status == 401:
            code = "invalid_api_key"
        kind = _OPENAI_TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        body = {"message": error.message, "type": kind, "param": param, "code": code}
        return status, {"error": body}
    google: dict[str, Any] = {"code": status, "status": error.code.name, "message": error.message}
    reason = getattr(error, "reason", None)  # the feedback gateway's rejection reason
    if isinstance(reason, str):
        google["reason"] = reason
    return status, {"error": google}


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_response(
    body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=dumps)


def error_response(error: CallError, style: Style) -> web.Response:
    status, body = error_body(error, style)
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return json_response(body, status=status, headers=headers)


class EventStream:
    """A server-sent events response: ``data: <json>`` events, in the route's style."""

    def __init__(self, request: web.Request, style: Style, headers: Mapping[str, str]) -> None:
        self._request = request
        self._style = style
        self.response = web.StreamResponse(
            headers={
                "content-type": "text/event-stream",
                "cache-control": "no-cache",
                "x-accel-buffering": "no",  # proxies must not buffer tokens
                **headers,
            }
        )

    async def open(self) -> None:
        await self.response.prepare(self._request)

    async def send(self, data: Any) -> None:
        text = data if isinstance(data, str) else dumps(data)
        # A client that left makes this raise ConnectionResetError; its handler ends with it.
        await self.response.write(f"data: {text}\n\n".encode())

    async def fail(self, error: CallError) -> None:
        """Ends the stream with an error event (the status line was sent long ago)."""
        self._request[CODE] = error.code.name
        _, body = error_body(error, self._style)
        await self.send(body)


class HttpDoor:
    """An aiohttp application on the runtime's HTTP port (see the module doc)."""

    def __init__(self, runtime: ServerRuntime, *, style: Style) -> None:
        self._runtime = runtime
        self._style = style
        config = runtime.config
        self._cors = frozenset(config.http_cors_origins)
        self.app = web.Application(
            client_max_size=config.max_message_bytes, middlewares=[self._edge]
        )
        self.app[MAX_BODY] = config.max_message_bytes
        self.app.on_response_prepare.append(self._cors_headers)
        self._runner: web.AppRunner | None = None
        self.port = -1
        runtime.add_door(self)

    def route(
        self,
        method: str,
        path: str,
        handler: Handler,
        *,
        scope: Scope | None,
        style: Style | None = None,
    ) -> None:
        """Serves ``handler`` at ``method path``; ``scope`` None means no key is needed."""
        self.app.router.add_route(method, path, self._wrap(path, handler, scope, style))

    def health(self, path: str, services: Iterable[str], style: Style | None = None) -> None:
        """``GET path``: 200 when every one of ``services`` is ready, else 503 (no key needed)."""
        names = list(services)

        async def health(_request: web.Request) -> web.Response:
            down = [s for s in names if not self._runtime.is_ready(s)]
            if down:
                raise CallError(grpc.StatusCode.UNAVAILABLE, f"not serving: {', '.join(down)}")
            return web.Response(status=200)

        self.route("GET", path, health, scope=None, style=style)

    def _wrap(
        self, path: str, handler: Handler, scope: Scope | None, style: Style | None
    ) -> Handler:
        metrics = self._runtime.metrics
        keys = self._runtime.keys
        error_style = style or self._style

        async def handle(request: web.Request) -> web.StreamResponse:
            start = metrics.started("http", path)
            code = grpc.StatusCode.CANCELLED.name
            try:
                if scope is not None:
                    headers = [(name.lower(), value) for name, value in request.headers.items()]
                    denial = check_key(keys, scope, presented_key(headers))
                    if denial is not None:
                        raise denial
                response = await handler(request)
                code = request.get(CODE, grpc.StatusCode.OK.name)
                return response
            except CallError as error:
                code = error.code.name
                return error_response(error, error_style)
            except ConnectionResetError:
                raise  # the client left mid-response: nobody to answer
            except Exception:
                log.exception("HTTP %s %s failed", request.method, path)
                code = grpc.StatusCode.INTERNAL.name
                failure = CallError(
                    grpc.StatusCode.INTERNAL, "internal error (logged by the server)"
                )
                return error_response(failure, error_style)
            finally:
                metrics.finished("http", path, code, start)

        return handle

    @web.middleware
    async def _edge(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """CORS preflight, and unknown paths or methods answered in the door's error shape."""
        if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            return self._preflight(request)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            error = HttpError(
                grpc.StatusCode.NOT_FOUND, f"no such endpoint: {request.method} {request.path}"
            )
        except web.HTTPMethodNotAllowed as exc:
            error = HttpError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{request.method} is not allowed on {request.path} "
                f"(allowed: {', '.join(sorted(exc.allowed_methods))})",
                status=405,
            )
        return error_response(error, self._style)

    def _allowed_origin(self, request: web.Request) -> str | None:
        origin = request.headers.get("origin")
        if origin is None or not self._cors:
            return None
        return origin if "*" in self._cors or origin in self._cors else None

    def _preflight(self, request: web.Request) -> web.Response:
        origin = self._allowed_origin(request)
        if origin is None:
            return web.Response(status=403, text="CORS: origin not allowed")
        return web.Response(
            status=204,
            headers={
                "access-control-allow-origin": origin,
                "access-control-allow-methods": "GET, POST, OPTIONS",
                "access-control-allow-headers": ALLOWED_HEADERS,
                "access-control-max-age": "600",
                "vary": "origin",
            },
        )

    async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = self._allowed_origin(request)
        if origin is not None:
            response.headers["access-control-allow-origin"] = origin
            response.headers["access-control-expose-headers"] = EXPOSED_HEADERS
            response.headers["vary"] = "origin"

    async def start(self) -> None:
        config = self._runtime.config
        if config.http_port < 0:
            return
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # a client that leaves cancels its generation
            access_log=None,
            shutdown_timeout=config.grace_s,
        )
        await runner.setup()
        tls = server_ssl_context(config.tls) if config.tls.enabled else None
        site = web.TCPSite(runner, config.http_host, config.http_port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                f"cannot bind HTTP port {config.http_host}:{config.http_port} (in use?)"
            ) from exc
        self._runner = runner
        self.port = runner.addresses[0][1]
        self._runtime.http_port = self.port
        log.info(
            "%s HTTP API listening on %s:%d%s",
            self._runtime.component,
            config.http_host,
            self.port,
            " with TLS" if tls is not None else "",
        )

    async def stop(self, grace_s: float) -> None:
        if self._runner is None:
            return
        # Stops listening, gives in-flight requests up to grace_s, then cancels them.
        await asyncio.wait_for(self._runner.cleanup(), grace_s + 5.0)
        self._runner = None
