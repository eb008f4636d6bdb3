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
  say where it broke (400), typed field reads that name the field and the expected type;
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
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from rlhf.auth import presented_key
from rlhf.calls import check_key
from rlhf.runtime import CallError, Scope, ServerRuntime
from rlhf.tls import server_ssl_context

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; 413 when over the size limit, 400 when not JSON."""
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(None, limit) from None
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise _unreadable(f"the request body is not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise _unreadable(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise _unreadable(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _unreadable(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _unreadable(message: str) -> HttpError:
    # 400 in every style: TGI's 422 is for a well-formed request with bad values.
    return HttpError(grpc.StatusCode.INVALID_ARGUMENT, message, status=400)


def parse_proto(body: Any, message: M, where: str = "") -> M:
    """A JSON value into ``message`` by protobuf's JSON mapping (the project's own JSON APIs);
    an unknown field or a wrong type is a 400 naming it."""
    try:
        return json_format.ParseDict(body, message)
    except json_format.ParseError as exc:
        raise invalid(f"{where}{exc}".replace("\n", " ")) from None


def proto_json(message: Message) -> dict[str, Any]:
    """``message`` in protobuf's JSON mapping, with the .proto field names and every field."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _too_large(size: int | None, limit: int) -> HttpError:
    got = f"{size} bytes" if size is not None else "more"
    return HttpError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the request body is {got}, over the limit of {limit} bytes",
        status=413,
    )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class Fields:
    """Typed reads from a JSON object; a wrong type is a 400 naming the field.

    A missing field and an explicit ``null`` both read as None (the APIs served here treat
    ``null`` as "use the default").
    """

    def __init__(self, data: Mapping[str, Any], prefix: str = "") -> None:
        self.data = data
        self._prefix = prefix

    def name(self, field: str) -> str:
        return f"{self._prefix}{field}"

    def _wrong(self, field: str, expected: str, value: Any) -> HttpError:
        return invalid(
            f"Invalid type for '{self.name(field)}': expected {expected}, "
            f"but got {_kind(value)} instead.",
            self.name(field),
        )

    def out_of_range(self, field: str, value: Any, allowed: str) -> HttpError:
        return invalid(
            f"Invalid value for '{self.name(field)}': {value!r}; expected {allowed}.",
            self.name(field),
        )

    def string(self, field: str) -> str | None:
        value = self.data.get(field)
        if value is not None and not isinstance(value, str):
            raise self._wrong(field, "a string", value)
        return value

    def boolean(self, field: str) -> bool | None:
        value = self.data.get(field)
        if value is not None and not isinstance(value, bool):
            raise self._wrong(field, "a boolean", value)
        return value

    def integer(self, field: str, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.data.get(field)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(field, "an integer", value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.out_of_range(field, value, _range(lo, hi))
        return value

    def number(self, field: str, lo: float | None = None, hi: float | None = None) -> float | None:
        value = self.data.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong(field, "a number", value)
        number = float(value)
        if (
            not math.isfinite(number)
            or (lo is not None and number < lo)
            or (hi is not None and number > hi)
        ):
            raise self.out_of_range(field, value, _range(lo, hi))
        return number

    def strings(self, field: str, max_items: int | None = None) -> list[str] | None:
        """A string or an array of strings (as OpenAI's ``stop``), as a list."""
        value = self.data.get(field)
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise self._wrong(field, "a string or an array of strings", value)
        if max_items is not None and len(items) > max_items:
            raise self.out_of_range(field, value, f"at most {max_items} entries")
        return items

    def object(self, field: str) -> Fields | None:
        value = self.data.get(field)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._wrong(field, "an object", value)
        return Fields(value, f"{self.name(field)}.")

    def only(self, allowed: Iterable[str]) -> None:
        """Rejects any field not in ``allowed``, as OpenAI does."""
        known = set(allowed)
        for field in self.data:
            if field not in known:
                raise invalid(
                    f"Unrecognized request argument supplied: {self.name(field)}", self.name(field)
                )

    def unsupported(self, field: str, default: Any = None) -> None:
        """Refuses a field this server does not implement unless it holds its no-op default."""
        value = self.data.get(field)
        if value is not None and value != default and value not in ({}, []):
            raise invalid(
                f"'{self.name(field)}' is not supported by this server "
                f"(leave it unset{'' if default is None else f' or {default!r}'})",
                self.name(field),
            )


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"a value in [{lo}, {hi}]"
    return f"a value >= {lo}" if lo is not None else f"a value <= {hi}"


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
