"""The server runtime every gRPC service of the system runs on.

One ``ServerRuntime`` per process gives a service, without any code of its own:

* a ``grpc.aio`` server with message size limits (oversized messages: ``RESOURCE_EXHAUSTED``);
* standard health checking (``grpc.health.v1.Health``) and server reflection;
* API-key authentication with scopes (``infer``, ``feedback``, ``admin``; ``rlhf/auth.py``):
  keys come from a file (re-read when it changes) and/or an inline setting (usually an
  environment variable), are compared in constant time, a missing or unknown key is
  ``UNAUTHENTICATED`` and a key without the method's scope is ``PERMISSION_DENIED``, both
  before the request body is parsed; a malformed body is ``INVALID_ARGUMENT``
  (``rlhf/calls.py``). Health and reflection stay open so probes need no key. With no keys
  configured, authentication is off and the server says so loudly at start-up;
* TLS from certificate files, reloaded when they change (``runtime.tls.*``, ``rlhf/tls.py``),
  on the gRPC port, the HTTP port and ``/metrics``;
* health conditions: a service is SERVING only while everything it needs holds
  (``set_condition``; a model loaded, Kafka reachable...), each one exported as
  ``rlhf_<component>_health_condition{service,condition}``;
* Prometheus metrics on ``/metrics``: ``rlhf_<component>_requests_total{protocol,method,code}``,
  ``rlhf_<component>_request_duration_seconds{protocol,method,code}`` and
  ``rlhf_<component>_requests_in_flight{protocol,method}``, next to whatever the service
  registers (``protocol`` is ``grpc`` or ``http``; ``code`` is a gRPC status name for both);
* further doors on the same event loop (``add_door``): the HTTP/JSON API of ``rlhf/http.py``
  starts after the gRPC server, with the same keys, metrics and TLS, and drains beside it;
* graceful shutdown on SIGTERM/SIGINT: health turns ``NOT_SERVING`` (load balancers stop
  sending), in-flight calls get ``grace_s`` to finish (``server.stop(grace)``), then the
  service's own stop hooks run (engines, Kafka producers).

How a service plugs in (``services/<name>/server.py``)::

    @dataclass(frozen=True)
    class PolicyServerConfig:
        runtime: RuntimeConfig = dataclasses.field(
            default_factory=lambda: RuntimeConfig(port=50051, metrics_port=9101),
            metadata={"help": "gRPC server, auth and metrics"})
        ...

    async def serve(config: PolicyServerConfig) -> None:
        registry = CollectorRegistry()
        runtime = ServerRuntime(config.runtime, registry, component="policy")

        async def add_servicers(server: grpc.aio.Server) -> None:
            engine = ...                                  # built inside the server's event loop
            runtime.on_stop(engine.stop)                  # runs after in-flight calls drained
            inference_pb2_grpc.add_InferenceServiceServicer_to_server(Servicer(engine), server)

        # Keys: full service names (also registered for reflection); values: required scope.
        await runtime.serve(add_servicers, {"rlhf.v1.InferenceService": Scope.INFER})

    def main(argv: list[str]) -> int:
        config = parse_config(PolicyServerConfig, argv, prog="rlhf serve policy", ...)
        asyncio.run(serve(config))
        return 0

A per-method scope is given by the full method name instead (``"/rlhf.v1.AdminService/GetStatus"``),
which wins over its service's entry. Tests and the in-process demo run the same code in a
background thread: ``runtime.start_in_thread(add_servicers, services)`` returns once the server
listens (``runtime.port`` / ``runtime.metrics_port`` are the bound ports, useful with port 0),
and ``runtime.stop_in_thread()`` shuts it down gracefully.

Clients send the key as ``authorization: Bearer <key>`` (or ``x-api-key: <key>``) metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

# Re-exported: services import the auth names and CallError from the runtime they plug into.
from rlhf.auth import KeyStore as KeyStore
from rlhf.auth import Scope as Scope
from rlhf.auth import parse_api_keys as parse_api_keys
from rlhf.calls import PUBLIC_SERVICES, CallInterceptor, CallMetrics
from rlhf.calls import CallError as CallError
from rlhf.config import option
from rlhf.metrics_http import serve_metrics
from rlhf.tls import TlsConfig, grpc_server_credentials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeConfig:
    # Loopback by default: a server started by hand is not reachable from elsewhere until
    # asked to be (the chart and the image bind 0.0.0.0 explicitly).
    host: str = option("127.0.0.1", "address the gRPC server binds to (0.0.0.0: every interface)")
    port: int = option(50051, "gRPC port (0 picks a free port)")
    metrics_host: str = option(
        "127.0.0.1", "address the Prometheus /metrics endpoint binds to (0.0.0.0: every interface)"
    )
    metrics_port: int = option(9100, "Prometheus /metrics port (0 picks a free port, -1 disables)")
    api_keys: str = option(
        "",
        "API keys inline, entries 'KEY SCOPE[,SCOPE]' separated by ';' or newlines "
        "(scopes: infer, feedback, admin); usually set from the environment",
    )
    api_keys_file: str = option(
        "", "file of API keys, one 'KEY SCOPE[,SCOPE]' per line, '#' starts a comment"
    )
    require_auth: bool = option(
        False, "refuse to start when no API key is configured (instead of serving without auth)"
    )
    max_message_bytes: int = option(
        4 * 1024 * 1024, "largest gRPC message received or sent, and largest HTTP request body"
    )
    max_concurrent_rpcs: int = option(
        0, "calls served at once before new ones get RESOURCE_EXHAUSTED (0: no limit)"
    )
    grace_s: float = option(10.0, "seconds in-flight calls get to finish on shutdown")
    http_host: str = option(
        "127.0.0.1", "address the HTTP/JSON API binds to (0.0.0.0: every interface)"
    )
    http_port: int = option(-1, "HTTP/JSON API port (0 picks a free port, -1 disables)")
    http_cors_origins: tuple[str, ...] = option(
        (),
        "origins a web page may call the HTTP API from (CORS), comma-separated, e.g. "
        "https://label.example.com; '*' allows any; empty: no CORS headers",
    )
    tls: TlsConfig = dataclasses.field(
        default_factory=TlsConfig,
        metadata={
            "help": "TLS for the gRPC, HTTP and /metrics ports (certificate files, reloaded)"
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in -1..65535, got {self.metrics_port}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in -1..65535, got {self.http_port}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_concurrent_rpcs < 0:
            raise ValueError(f"max_concurrent_rpcs must be >= 0, got {self.max_concurrent_rpcs}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        parse_api_keys(self.api_keys, where="api_keys")  # fail at start-up, not at first call


AddServicers = Callable[[grpc.aio.Server], Awaitable[None] | None]
StopHook = Callable[[], Awaitable[None] | None]


class Door(Protocol):
    """Another front door served from the runtime's event loop beside gRPC (``rlhf/http.py``)."""

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None:
        """Stops taking calls and gives in-flight ones ``grace_s`` to finish."""


class ServerRuntime:
    """A gRPC server with health, reflection, auth, metrics and graceful shutdown (see module doc)."""

    def __init__(
        self, config: RuntimeConfig, registry: CollectorRegistry, *, component: str
    ) -> None:
        self.config = config
        self.registry = registry
        self.component = component
        self.keys = KeyStore.from_settings(config.api_keys, config.api_keys_file)
        if config.require_auth and not self.keys.enabled:
            raise ValueError("require_auth is set but no API key is configured")
        self.metrics = CallMetrics(registry, component)
        self._doors: list[Door] = []
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._metrics_http: Any = None
        self._stop_hooks: list[StopHook] = []
        self._stop_requested: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        # service -> failing condition -> what is wrong; a service with none is SERVING.
        self._failing: dict[str, dict[str, str]] = {}
        self._service_names: set[str] = set()
        self._conditions_lock = threading.Condition()
        self.port = 0
        self.metrics_port = -1
        self.http_port = -1  # set by the HTTP door once it listens

    def add_door(self, door: Door) -> None:
        """Serves ``door`` too: started after the gRPC server, drained beside it on stop."""
        self._doors.append(door)

    def is_ready(self, service: str) -> bool:
        """Whether ``service`` is SERVING: all its conditions hold and the server is not draining."""
        return not self._stopped and not self.failing(service)

    def on_stop(self, hook: StopHook) -> None:
        """Runs ``hook`` (sync or async) after in-flight calls drained; hooks run in reverse order."""
        self._stop_hooks.append(hook)

    async def start(self, add_servicers: AddServicers, services: Mapping[str, Scope]) -> None:
        """Builds and starts the server. ``services``: full service or method name -> scope."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        scopes = {name: Scope(scope) for name, scope in services.items()}
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            # A restarted replica must be able to bind while the old socket is in TIME_WAIT,
            # but two live servers on one port would split traffic unnoticed.
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(
            interceptors=[CallInterceptor(self.keys, scopes, self.metrics)],
            options=options,
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs or None,
        )
        result = add_servicers(server)
        if inspect.isawaitable(result):
            await result
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        service_names = sorted({name.lstrip("/").split("/", 1)[0] for name in scopes})
        self._service_names = set(service_names)
        reflection.enable_server_reflection([*service_names, *PUBLIC_SERVICES], server)
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls.enabled:
                self.port = server.add_secure_port(address, grpc_server_credentials(cfg.tls))
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC port {cfg.host}:{cfg.port} (in use?)") from exc
        await server.start()
        self._server = server
        for name in service_names:
            await self._health.set(name, self._status(not self._failing.get(name)))
        for door in self._doors:
            await door.start()
        if cfg.metrics_port >= 0:
            self._metrics_http = serve_metrics(
                self.registry, cfg.metrics_host, cfg.metrics_port, cfg.tls, self.health_of
            )
            self.metrics_port = self._metrics_http.server_port
        if not self.keys.enabled:
            log.warning(
                "\n%s\n!! %s server: NO API KEYS CONFIGURED - AUTHENTICATION IS OFF.\n"
                "!! Anyone who can reach port %d can call every method.\n"
                "!! Set api_keys / api_keys_file (and require_auth) before exposing it.\n%s",
                "!" * 72,
                self.component,
                self.port,
                "!" * 72,
            )
        log.info(
            "%s server listening on %s:%d%s (metrics on %s), services: %s",
            self.component,
            cfg.host,
            self.port,
            " with TLS" if cfg.tls.enabled else "",
            f"port {self.metrics_port}" if self.metrics_port >= 0 else "off",
            ", ".join(service_names),
        )

    @staticmethod
    def _status(ready: bool) -> Any:
        return (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    def set_condition(self, service: str, condition: str, ok: bool, detail: str = "") -> None:
        """Records whether one thing ``service`` needs in order to serve holds (a model
        loaded, Kafka reachable, a topic tail running...). The service is SERVING in health
        checks only while all its conditions hold; each is exported as
        ``rlhf_<component>_health_condition{service,condition}`` and every change is logged.
        Callable from any thread, before or after start; health is frozen once draining."""
        with self._conditions_lock:
            failing = self._failing.setdefault(service, {})
            was_ready = not failing
            before = failing.get(condition)
            if ok:
                failing.pop(condition, None)
            else:
                failing[condition] = detail
            ready = not failing
            self._conditions_lock.notify_all()
        self.metrics.conditions.labels(service, condition).set(1 if ok else 0)
        if ok and before is not None:
            log.info("%s: %s holds again", service, condition)
        elif not ok and before != detail:
            log.warning("%s: %s fails: %s", service, condition, detail or "(no detail)")
        if ready != was_ready and self._loop is not None and not self._loop.is_closed():
            # The status is read when the loop runs this, so racing calls end in the last state.
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
                asyncio.run_coroutine_threadsafe(self._publish_health(service), self._loop)

    async def _publish_health(self, service: str) -> None:
        if self._health is not None and not self._stopped:
            await self._health.set(service, self._status(not self.failing(service)))

    def wait_serving(self, service: str, timeout_s: float) -> bool:
        """Blocks until every condition of ``service`` holds (e.g. the feedback gateway has
        rebuilt its index from Kafka), or the timeout; True when it does."""
        with self._conditions_lock:
            return self._conditions_lock.wait_for(
                lambda: not self._failing.get(service), timeout=timeout_s
            )

    def health_of(self, service: str) -> dict[str, str] | None:
        """What ``/health/<service>`` reports: None for an unknown service, else the failing
        conditions ({} while SERVING); "" is the whole server, failing only while draining."""
        if not service:
            return {"server": "shutting down"} if self._stopped else {}
        if service not in self._service_names:
            return None
        return {"server": "shutting down"} if self._stopped else self.failing(service)

    def failing(self, service: str) -> dict[str, str]:
        """The conditions of ``service`` that do not hold now, with what is wrong."""
        with self._conditions_lock:
            return dict(self._failing.get(service, {}))

    def set_ready(self, service: str, ready: bool) -> None:
        """Shorthand for the condition ``ready`` (e.g. NOT_SERVING until a model is loaded)."""
        self.set_condition(service, "ready", ready, "" if ready else "not ready yet")

    def request_stop(self) -> None:
        """Asks ``serve`` to shut down; safe to call from any thread or a signal handler."""
        if self._loop is None or self._stop_requested is None:
            return
        self._loop.call_soon_threadsafe(self._stop_requested.set)

    async def stop(self) -> None:
        """Graceful shutdown: NOT_SERVING, drain for ``grace_s``, stop hooks, metrics endpoint."""
        if self._stopped:
            return
        self._stopped = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        grace = self.config.grace_s
        log.info("%s server draining (grace %.1fs)", self.component, grace)
        await asyncio.gather(
            *([self._server.stop(grace)] if self._server is not None else []),
            *(door.stop(grace) for door in self._doors),
        )
        for hook in reversed(self._stop_hooks):
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("%s server: stop hook %r failed", self.component, hook)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("%s server stopped", self.component)

    async def serve(
        self,
        add_servicers: AddServicers,
        services: Mapping[str, Scope],
        *,
        handle_signals: bool = True,
        started: Callable[[], None] | None = None,
    ) -> None:
        """Starts, serves until SIGTERM/SIGINT (or ``request_stop``), then stops gracefully."""
        try:
            await self.start(add_servicers, services)
            assert self._stop_requested is not None
            loop = asyncio.get_running_loop()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self._stop_requested.set)
            if started is not None:
                started()
            await self._stop_requested.wait()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        finally:
            await self.stop()

    def start_in_thread(
        self, add_servicers: AddServicers, services: Mapping[str, Scope], *, timeout_s: float = 60.0
    ) -> None:
        """Serves from a daemon thread with its own event loop; returns once listening."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(
                    self.serve(add_servicers, services, handle_signals=False, started=ready.set)
                )
            except BaseException as exc:
                failure.append(exc)
                log.exception("%s server thread failed", self.component)
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name=f"{self.component}-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"{self.component} server did not start within {timeout_s}s")
        if failure:
            raise RuntimeError(f"{self.component} server failed to start") from failure[0]

    def stop_in_thread(self, timeout_s: float | None = None) -> None:
        """Stops a server started with ``start_in_thread`` and waits for its thread."""
        self.request_stop()
        if self._thread is not None:
            wait = self.config.grace_s + 30.0 if timeout_s is None else timeout_s
            self._thread.join(wait)
            if self._thread.is_alive():
                raise TimeoutError(f"{self.component} server did not stop within {wait}s")
