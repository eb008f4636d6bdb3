"""The policy server's TGI-compatible HTTP API, driven by ``huggingface_hub.InferenceClient``
(the client TGI's users have) on localhost, with the Kafka record of every generation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

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
