"""The HTTP doors over TLS from the runtime's certificate files: the OpenAI SDK over https
trusting the test CA, a client trusting another CA refused, rotated files picked up by new
connections without a restart."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import openai
import pytest
from prometheus_client import CollectorRegistry

from rlhf.models import build_tiny
from rlhf.tls import TlsConfig
from services.policy.server import PolicyServer
from tests.pki import Authority
from tests.test_http_openai import KEY
from tests.test_policy_server import VERSION, make_config
from tests.test_tls import wait_until


def complete(port: int, ca: Authority | None) -> str:
    """One completion over https; raises openai.APIConnectionError when TLS fails."""
    verify = ssl.create_default_context(cadata=ca.pem.decode()) if ca else True
    client = openai.OpenAI(
        base_url=f"https://localhost:{port}/v1",
        api_key=KEY,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=verify),
    )
    with client:
        return client.completions.create(model="policy", prompt="Hi", max_tokens=2).model


def test_openai_sdk_over_tls_with_rotated_certificates(tmp_path: Path) -> None:
    ca1, ca2 = Authority("rlhf http CA 1"), Authority("rlhf http CA 2")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    ca1.issue("localhost", server=True).write(cert, key)
    base = make_config(build_tiny(tmp_path / "tiny", seed=0))
    runtime = dataclasses.replace(
        base.runtime, tls=TlsConfig(cert_file=str(cert), key_file=str(key))
    )
    server = PolicyServer(dataclasses.replace(base, runtime=runtime), CollectorRegistry())
    server.start_in_thread()
    port = server.runtime.http_port
    try:
        assert complete(port, ca1) == VERSION
        with pytest.raises(openai.APIConnectionError):
            complete(port, ca2)
        with pytest.raises(openai.APIConnectionError):
            complete(port, None)  # the system's trust store does not know the test CA
        plain = openai.OpenAI(base_url=f"http://localhost:{port}/v1", api_key=KEY, max_retries=0)
        with plain, pytest.raises(openai.APIConnectionError):
            plain.completions.create(model="policy", prompt="Hi", max_tokens=2)

        ca2.issue("localhost", server=True).write(cert, key)  # rotation, no restart

        def rotated() -> bool:
            try:
                return complete(port, ca2) == VERSION
            except openai.APIConnectionError:
                return False

        wait_until(rotated)
        with pytest.raises(openai.APIConnectionError):
            complete(port, ca1)
    finally:
        server.stop_in_thread()
