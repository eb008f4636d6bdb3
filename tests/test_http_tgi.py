"""The policy server's TGI-compatible HTTP API, driven by ``huggingface_hub.InferenceClient``
(the client TGI's users have) on localhost, with the Kafka record of every generation, and by
TGI's own ``text-generation`` client. That client pins ``huggingface_hub<1``, which cannot share
the project's environment (``huggingface_hub`` 2.x), so it runs from a virtualenv of its own,
built on first use under ~/.cache/rlhf (``$RLHF_CACHE``) and reused afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, ValidationError
from prometheus_client import CollectorRegistry

from rlhf.models import build_tiny
from services.policy.server import PolicyServer
from tests.test_http_openai import KEY, served
from tests.test_policy_server import VERSION, make_config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, kafka) -> Iterator[PolicyServer]:
    model = build_tiny(tmp_path_factory.mktemp("tgi") / "tiny", seed=0)
    srv = PolicyServer(make_config(model, kafka.bootstrap_servers), CollectorRegistry())
    srv.start_in_thread()
    yield srv
    srv.stop_in_thread()


@pytest.fixture(scope="module")
def url(server: PolicyServer) -> str:
    return f"http://127.0.0.1:{server.runtime.http_port}"


@pytest.fixture(scope="module")
def client(url: str) -> InferenceClient:
    return InferenceClient(base_url=url, api_key=KEY)


def test_text_generation_with_details(client: InferenceClient, kafka) -> None:
    rid = uuid.uuid4().hex
    client.headers["x-request-id"] = rid
    try:
        out = client.text_generation(
            "Hello", max_new_tokens=6, details=True, seed=3, temperature=0.8, top_k=50
        )
    finally:
        del client.headers["x-request-id"]
    details = out.details
    assert details is not None and details.seed == 3 and details.prefill == []
    assert details.finish_reason in ("length", "eos_token")
    assert details.generated_tokens == len(details.tokens) <= 6
    assert all(t.logprob is not None and t.logprob <= 0 for t in details.tokens)
    assert out.model_version == VERSION  # extensions TGI clients keep as extra attributes
    event = served(kafka.bootstrap_servers, rid)[rid]
    assert event.samples[0].generation_id == out.generation_id
    assert event.samples[0].text == out.generated_text
    assert list(event.samples[0].token_ids) == [t.id for t in details.tokens]
    # Without details: the text only, the same for the same seed.
    text = client.text_generation("Hello", max_new_tokens=6, seed=3, temperature=0.8, top_k=50)
    assert text == out.generated_text
    full = client.text_generation(
        "Hello", max_new_tokens=6, seed=3, temperature=0.8, top_k=50, return_full_text=True
    )
    assert full == "Hello" + text


def test_stream_tokens_add_up_to_the_generated_text(client: InferenceClient) -> None:
    events = list(
        client.text_generation(
            "Once upon", max_new_tokens=20, stream=True, details=True, seed=4, do_sample=True
        )
    )
    last = events[-1]
    assert last.generated_text is not None and last.details is not None
    assert all(e.generated_text is None for e in events[:-1])
    assert "".join(e.token.text for e in events) == last.generated_text
    assert last.details.generated_tokens == len(events)
    assert last.details.input_length == 10  # BOS + 9 bytes
    assert last.generation_id and last.model_version == VERSION
    texts = list(
        client.text_generation("Once upon", max_new_tokens=20, stream=True, seed=4, do_sample=True)
    )
    assert "".join(texts) == last.generated_text


def test_validation_and_auth_errors(client: InferenceClient, url: str) -> None:
    with pytest.raises(ValidationError) as err:
        client.text_generation("Hello", max_new_tokens=6, temperature=-1.0)
    assert "temperature" in str(err.value)
    with pytest.raises(ValidationError, match="not supported"):
        client.text_generation("Hello", max_new_tokens=6, typical_p=0.5)
    with pytest.raises(HfHubHTTPError) as denied:
        InferenceClient(base_url=url, api_key="wrong").text_generation("Hello", max_new_tokens=2)
    assert denied.value.response.status_code == 401
    reply = httpx2.post(
        url + "/generate",
        json={"inputs": "", "parameters": {}},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert reply.status_code == 422
    assert reply.json() == {"error": "`inputs` cannot be empty", "error_type": "validation"}


def test_info_health_tokenize_and_compat_route(url: str) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    assert httpx2.get(url + "/health").status_code == 200  # probes need no key
    info = httpx2.get(url + "/info", headers=auth).json()
    assert info["model_id"] == VERSION and info["max_input_tokens"] == 64
    assert info["max_total_tokens"] == 64 + 1500 and info["model_versions"] == [VERSION]
    tokens = httpx2.post(url + "/tokenize", json={"inputs": "Hé!"}, headers=auth).json()
    assert [t["id"] for t in tokens][1:] == list("Hé!".encode())
    # Offsets are characters of the input; the two bytes of "é" both cover it.
    spans = [(t["start"], t["stop"], t["text"]) for t in tokens][1:]
    assert spans == [(0, 1, "H"), (1, 2, "é"), (1, 2, "é"), (2, 3, "!")]
    compat = httpx2.post(
        url + "/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, headers=auth
    )
    assert compat.status_code == 200 and isinstance(compat.json(), list)
    assert compat.headers["x-rlhf-generation-ids"] == compat.json()[0]["generation_id"]
    streamed = httpx2.post(
        url + "/",
        json={"inputs": "Hi", "stream": True, "parameters": {"max_new_tokens": 3}},
        headers=auth,
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.count("data:") == 3


TEXT_GENERATION = "text-generation==0.7.0"
_TEXT_GENERATION_SCRIPT = r"""
import asyncio, json, sys
from text_generation import AsyncClient, Client
from text_generation.errors import ValidationError

url, key = sys.argv[1], sys.argv[2]
headers = {"authorization": f"Bearer {key}"}
kwargs = dict(max_new_tokens=8, seed=3, do_sample=True, temperature=0.8, top_k=40)
client = Client(url, headers=headers, timeout=60)
out = client.generate("Hello", **kwargs)
events = list(client.generate_stream("Hello", **kwargs))
async_out = asyncio.run(AsyncClient(url, headers=headers, timeout=60).generate("Hello", **kwargs))
try:
    client.generate("Hello", max_new_tokens=8, temperature=-1.0)
    error = None
except ValidationError as exc:
    error = str(exc)
print(json.dumps({
    "text": out.generated_text,
    "finish_reason": out.details.finish_reason,
    "generated_tokens": out.details.generated_tokens,
    "token_ids": [t.id for t in out.details.tokens],
    "seed": out.details.seed,
    "streamed": "".join(e.token.text for e in events),
    "stream_final": events[-1].generated_text,
    "async_text": async_out.generated_text,
    "validation_error": error,
}))
"""


def text_generation_python() -> Path:
    """A virtualenv with TGI's ``text-generation`` client (created on first use)."""
    cache = Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))
    venv = cache / f"client-{TEXT_GENERATION.replace('==', '-')}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", TEXT_GENERATION],
        check=True,
        timeout=900,
    )
    (venv / ".complete").touch()
    return python


def test_tgi_text_generation_client(url: str, tmp_path: Path) -> None:
    python = text_generation_python()
    script = tmp_path / "tgi_client.py"
    script.write_text(_TEXT_GENERATION_SCRIPT)
    done = subprocess.run(
        [str(python), str(script), url, KEY], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["generated_tokens"] == len(got["token_ids"]) <= 8
    assert got["finish_reason"] in ("length", "eos_token") and got["seed"] == 3
    # Same seed: the sync, streamed and async calls produce the same text.
    assert got["streamed"] == got["stream_final"] == got["text"] == got["async_text"]
    assert "temperature" in got["validation_error"]
