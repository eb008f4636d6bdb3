"""TLS on the gRPC and /metrics ports with certificates made at test time: a real secure
channel, a client trusting another CA fails, client certificates when required, and rotated
files are picked up without a restart."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from rlhf import tls
from rlhf.runtime import RuntimeConfig, Scope, ServerRuntime
from rlhf.tls import TlsConfig
from rlhf.v1 import inference_pb2, inference_pb2_grpc, reward_pb2, reward_pb2_grpc
from tests.pki import Authority, Issued
from tests.test_readme_serving import readme_blocks
from tests.test_runtime import LengthScorer


def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cas() -> tuple[Authority, Authority]:
    return Authority("rlhf test CA 1"), Authority("rlhf test CA 2")


def start(tls: TlsConfig, api_keys: str = "") -> ServerRuntime:
    config = RuntimeConfig(
        host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0, grace_s=0.5,
        tls=tls, api_keys=api_keys,
    )  # fmt: skip
    runtime = ServerRuntime(config, CollectorRegistry(), component="tlstest")

    def add(server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(LengthScorer(), server)

    runtime.start_in_thread(add, {"rlhf.v1.RewardService": Scope.INFER})
    return runtime


def check(port: int, ca: Authority, client: Issued | None = None) -> grpc.StatusCode:
    """Health over a fresh secure channel trusting ``ca``; OK or the failure's code."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
def server_files(tmp_path: Path, cas) -> Iterator[tuple[Path, Path]]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cas[0].issue("localhost", server=True).write(cert, key)
    yield cert, key


def test_grpc_and_metrics_over_tls_follow_rotated_files(server_files, cas) -> None:
    ca1, ca2 = cas
    cert, key = server_files
    runtime = start(TlsConfig(cert_file=str(cert), key_file=str(key)), api_keys="k-1 infer")
    try:
        assert check(runtime.port, ca1) == grpc.StatusCode.OK
        assert check(runtime.port, ca2) == grpc.StatusCode.UNAVAILABLE
        # A plaintext client cannot talk to the TLS port.
        plain = grpc.insecure_channel(f"127.0.0.1:{runtime.port}")
        with plain, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3)
        # API keys travel inside TLS: a real call with a key.
        creds = grpc.ssl_channel_credentials(root_certificates=ca1.pem)
        with grpc.secure_channel(f"localhost:{runtime.port}", creds) as channel:
            reply = reward_pb2_grpc.RewardServiceStub(channel).Score(
                reward_pb2.ScoreRequest(prompt="p", responses=["abc"]),
                metadata=[("authorization", "Bearer k-1")],
                timeout=5,
            )
        assert list(reply.rewards) == [3.0]

        metrics = f"https://localhost:{runtime.metrics_port}/metrics"
        ca1_context = ssl.create_default_context(cadata=ca1.pem.decode())
        body = urllib.request.urlopen(metrics, context=ca1_context, timeout=5).read()
        assert b"rlhf_tlstest_requests_total" in body
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(metrics, context=ssl.create_default_context(), timeout=5)

        # Rotation: a certificate from the other CA, written over the files; no restart.
        ca2.issue("localhost", server=True).write(cert, key)
        wait_until(lambda: check(runtime.port, ca2) == grpc.StatusCode.OK)
        assert check(runtime.port, ca1) == grpc.StatusCode.UNAVAILABLE
        ca2_context = ssl.create_default_context(cadata=ca2.pem.decode())

        def metrics_ok(context: ssl.SSLContext) -> bool:
            try:
                urllib.request.urlopen(metrics, context=context, timeout=5).read()
            except urllib.error.URLError:
                return False
            return True

        wait_until(lambda: metrics_ok(ca2_context))
        assert not metrics_ok(ca1_context)
    finally:
        runtime.stop_in_thread()


def test_client_certificates_when_required(server_files, cas, tmp_path: Path) -> None:
    ca1, ca2 = cas
    cert, key = server_files
    client_ca = tmp_path / "client-ca.crt"
    client_ca.write_bytes(ca1.pem)
    runtime = start(
        TlsConfig(
            cert_file=str(cert), key_file=str(key), client_ca_file=str(client_ca),
            require_client_cert=True,
        )
    )  # fmt: skip
    try:
        assert check(runtime.port, ca1, ca1.issue("client-a", server=False)) == grpc.StatusCode.OK
        assert check(runtime.port, ca1) == grpc.StatusCode.UNAVAILABLE
        stranger = ca2.issue("client-b", server=False)
        assert check(runtime.port, ca1, stranger) == grpc.StatusCode.UNAVAILABLE
    finally:
        runtime.stop_in_thread()


def test_a_half_written_rotation_keeps_the_old_certificate(
    server_files, cas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "CHECK_INTERVAL_S", 0.0)
    cert, key = server_files
    files = tls.CertificateFiles(tls.TlsConfig(cert_file=str(cert), key_file=str(key)))
    old = files.material
    new = cas[1].issue("localhost", server=True)
    cert.write_bytes(new.cert_pem)  # the key still belongs to the old certificate
    assert not files.refresh()
    assert files.material == old and files.version == 0
    key.write_bytes(new.key_pem)
    assert files.refresh()
    assert files.material.cert == new.cert_pem and files.version == 1
    assert not files.refresh()  # nothing changed since


def test_tls_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        TlsConfig(cert_file="a.crt")
    with pytest.raises(ValueError, match="require_client_cert needs client_ca_file"):
        TlsConfig(cert_file="a", key_file="b", require_client_cert=True)


class Echo(inference_pb2_grpc.InferenceServiceServicer):
    """Answers Generate with the prompt itself."""

    async def Generate(self, request, context):
        return inference_pb2.GenerateResponse(
            model_version="echo", samples=[inference_pb2.Sample(text=request.prompt)]
        )


def test_the_readme_tls_client_example(server_files, cas, tmp_path: Path) -> None:
    """The README's TLS client block, as written except for the server address."""
    cert, key = server_files
    config = RuntimeConfig(
        host="127.0.0.1", port=0, metrics_port=-1, grace_s=0.5, api_keys="my-infer-key infer",
        tls=TlsConfig(cert_file=str(cert), key_file=str(key)),
    )  # fmt: skip
    runtime = ServerRuntime(config, CollectorRegistry(), component="tlsreadme")
    runtime.start_in_thread(
        lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(Echo(), server),
        {"rlhf.v1.InferenceService": Scope.INFER},
    )
    try:
        _, block = readme_blocks("Serving: policy and reward servers", "ssl_channel_credentials")
        assert "policy.example.com:50051" in block
        code = block.replace("policy.example.com:50051", f"localhost:{runtime.port}")
        code += (
            "\nassert reply.samples[0].text == 'Hello', reply\nprint('ok', reply.model_version)\n"
        )
        (tmp_path / "ca.crt").write_bytes(cas[0].pem)
        (tmp_path / "client.py").write_text(code)
        root = Path(__file__).resolve().parents[1]
        done = subprocess.run(
            [sys.executable, "client.py"], cwd=tmp_path, capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(root)}, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ok echo" in done.stdout
    finally:
        runtime.stop_in_thread()


def test_the_charts_health_check_speaks_mutual_tls(server_files, cas, tmp_path: Path) -> None:
    """What `helm test` runs when the chart has a TLS Secret: gRPC health, /health and
    /metrics over TLS with a client certificate, against a server that requires one."""
    ca1, _ = cas
    cert, key = server_files
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca1.pem)
    client_cert, client_key = tmp_path / "client.crt", tmp_path / "client.key"
    ca1.issue("helm-test", server=False).write(client_cert, client_key)
    runtime = start(
        TlsConfig(
            cert_file=str(cert),
            key_file=str(key),
            client_ca_file=str(ca_file),
            require_client_cert=True,
        )
    )
    script = Path(__file__).resolve().parents[1] / "helm" / "rlhf" / "files" / "health_check.py"
    try:
        done = subprocess.run(
            [sys.executable, str(script), "--tls-ca", str(ca_file), "--tls-cert",
             str(client_cert), "--tls-key", str(client_key),
             "--grpc", f"localhost:{runtime.port}/rlhf.v1.RewardService",
             "--http", f"https://localhost:{runtime.metrics_port}/health/rlhf.v1.RewardService",
             "--metrics", f"https://localhost:{runtime.metrics_port}/metrics",
             "--timeout-s", "20"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        # The metrics port never requires a client certificate (kubelet probes it).
        plain_ca = ssl.create_default_context(cadata=ca1.pem.decode())
        url = f"https://localhost:{runtime.metrics_port}/health"
        assert urllib.request.urlopen(url, context=plain_ca, timeout=10).status == 200
    finally:
        runtime.stop_in_thread()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "health checks: 3 of 3 ok"
