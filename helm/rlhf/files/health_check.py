"""Health check run by ``helm test``: every gRPC server reports SERVING through grpc.health.v1,
every HTTP API answers its health URL with 200, and every /metrics endpoint serves Prometheus
text with rlhf_ metrics.

    python health_check.py --grpc HOST:PORT/SERVICE ... --http URL ... --metrics URL ... [--timeout-s 60]
        [--tls-ca ca.crt [--tls-cert tls.crt --tls-key tls.key]]

With ``--tls-ca`` the gRPC checks use TLS, trusting that CA (the system's CAs when the file
does not exist), and https:// URLs are verified against it; ``--tls-cert``/``--tls-key`` add
a client certificate for servers that require one.

Exits 0 when every check passes, 1 otherwise, printing one line per check. It ships in the
chart (a ConfigMap mounted into the test pod) and runs in the rlhf image, which has grpcio,
grpcio-health-checking and prometheus-client installed.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Tls:
    ca: str = ""
    cert: str = ""
    key: str = ""

    def _read(self, path: str) -> bytes | None:
        return open(path, "rb").read() if path and os.path.exists(path) else None

    def channel(self, address: str) -> grpc.Channel:
        if not self.ca:
            return grpc.insecure_channel(address)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca),
            private_key=self._read(self.key),
            certificate_chain=self._read(self.cert),
        )
        return grpc.secure_channel(address, credentials)

    def context(self) -> ssl.SSLContext | None:
        if not self.ca:
            return None
        ca = self.ca if os.path.exists(self.ca) else None
        context = ssl.create_default_context(cafile=ca)
        if self.cert and os.path.exists(self.cert):
            context.load_cert_chain(self.cert, self.key)
        return context


TLS = Tls()


def check_grpc(target: str, timeout_s: float) -> str | None:
    """Waits until ``HOST:PORT[/SERVICE]`` reports SERVING; returns an error or None.

    Health.Watch streams every status change, so a server that is still loading its model is
    waited for (until the deadline) instead of polled.
    """
    address, _, service = target.partition("/")
    with TLS.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        last = "no status received"
        try:
            for response in stub.Watch(request, timeout=timeout_s, wait_for_ready=True):
                if response.status == SERVING:
                    return None
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"{err.code().name}: {err.details()}"
        return f"not SERVING after {timeout_s:g}s ({last})"


def check_http(url: str, timeout_s: float) -> str | None:
    """Polls ``url`` (an HTTP API's /health) until it answers 200; a server still loading its
    model answers 503 and is waited for, until the deadline."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(
                url, timeout=max(1.0, min(5.0, timeout_s)), context=TLS.context()
            ) as response:
                if response.status == 200:
                    return None
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except OSError as err:
            last = f"GET failed: {err}"
        if time.monotonic() >= deadline:
            return f"not healthy after {timeout_s:g}s ({last})"
        time.sleep(1.0)


def check_metrics(url: str, timeout_s: float) -> str | None:
    """Fetches ``url`` and checks that it is Prometheus text holding rlhf_ metric families."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=TLS.context()) as response:
            body = response.read().decode()
    except OSError as err:
        return f"GET failed: {err}"
    try:
        names = [family.name for family in text_string_to_metric_families(body)]
    except ValueError as err:
        return f"not Prometheus text format: {err}"
    if not any(name.startswith("rlhf_") for name in names):
        return f"no rlhf_ metrics among {len(names)} families"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc", action="append", default=[], metavar="HOST:PORT/SERVICE")
    parser.add_argument("--http", action="append", default=[], metavar="URL")
    parser.add_argument("--metrics", action="append", default=[], metavar="URL")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per check")
    parser.add_argument("--tls-ca", default="", help="use TLS, trusting this CA file")
    parser.add_argument("--tls-cert", default="", help="client certificate (with --tls-ca)")
    parser.add_argument("--tls-key", default="", help="its private key")
    args = parser.parse_args(argv)
    global TLS
    TLS = Tls(args.tls_ca, args.tls_cert, args.tls_key)
    if not args.grpc and not args.http and not args.metrics:
        parser.error("nothing to check: give --grpc, --http and/or --metrics")

    failed = 0
    checks = [(f"grpc {t}", check_grpc, t) for t in args.grpc]
    checks += [(f"http {u}", check_http, u) for u in args.http]
    checks += [(f"metrics {u}", check_metrics, u) for u in args.metrics]
    for label, check, target in checks:
        start = time.monotonic()
        error = check(target, args.timeout_s)
        took = time.monotonic() - start
        print(f"{'FAIL' if error else 'ok  '} {label} ({took:.2f}s){': ' + error if error else ''}")
        failed += error is not None
    print(f"health checks: {len(checks) - failed} of {len(checks)} ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
