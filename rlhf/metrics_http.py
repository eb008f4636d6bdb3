"""The Prometheus port of every server: ``/metrics``, and ``/health`` for probes that speak
HTTP(S) only.

``GET /health`` answers 200 while the server runs (503 once it drains) and ``GET
/health/<service>`` 200 while that service is SERVING, else 503, with the failing conditions
in a JSON body; an unknown service is 404. Kubernetes can probe these over HTTPS (kubelet does
not verify certificates there), which its gRPC probes cannot: they do not speak TLS.

With TLS configured the port serves HTTPS from the same, reloaded certificate files. Client
certificates are accepted but never required here, even when the API ports require them, so
that kubelet and Prometheus can reach it; it serves no API and takes no key.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from rlhf.tls import TlsConfig, server_ssl_context

# service name ("" for the whole server) -> None when unknown, else its failing conditions.
Health = Callable[[str], dict[str, str] | None]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _app(registry: CollectorRegistry, health: Health) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path != "/health" and not path.startswith("/health/"):
            return metrics(environ, start_response)
        service = path[len("/health/") :]
        failing = health(service)
        body: dict[str, Any]
        if failing is None:
            status, body = "404 Not Found", {"error": f"unknown service {service!r}"}
        else:
            serving = not failing
            status = "200 OK" if serving else "503 Service Unavailable"
            body = {"status": "SERVING" if serving else "NOT_SERVING", "failing": failing}
        data = json.dumps({"service": service, **body}).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(data)))])  # fmt: skip
        return [data]

    return app


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, tls: TlsConfig, health: Health
) -> WSGIServer:
    """Serves ``/metrics`` and ``/health`` from a daemon thread (over TLS when configured);
    ``.server_port`` is the bound port."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

    httpd = make_server(host, port, _app(registry, health), Server, handler_class=_QuietHandler)
    if tls.enabled:
        optional = dataclasses.replace(tls, require_client_cert=False)
        httpd.socket = server_ssl_context(optional).wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd
