"""The workbench's HTTP API against real servers: a real broker, the feedback gateway, a tiny
policy server and a tiny reward server on localhost ports.

The queue's uncertainty order is checked against reward-model scores this test computes
itself from the model files; a task generated on demand carries the policy server's real
generation ids; a ranking with quality scores and flags reaches Kafka once, however often it
is sent; bad keys and bad submissions are refused with named errors and store nothing.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest
import torch
from prometheus_client import CollectorRegistry

from rlhf import bus, topics
from rlhf.encoding import EncodingSpec
from rlhf.kafka_local import LocalKafka
from rlhf.models import build_tiny, load_reward_model, reward_model_from_policy, score
from rlhf.runtime import ServerRuntime
from rlhf.v1 import events_pb2, inference_pb2, inference_pb2_grpc
from services.feedback.config import KafkaConfig, ResolverConfig
from services.feedback.gateway import event_id_for
from services.feedback.server import (
    SERVICES,
    FeedbackRuntimeConfig,
    FeedbackServerConfig,
    add_servicers,
)
from services.feedback.workbench.config import WorkbenchConfig
from services.feedback.workbench.routes import idempotency_key
from services.feedback.workbench.tasks import top_two_gap
from services.policy.server import PolicyServer
from services.reward.config import ModelConfig, RewardRuntimeConfig, RewardServerConfig
from services.reward.server import RewardServer
from tests.conftest import start_broker
from tests.test_feedback_gateway import read_events
from tests.test_policy_server import VERSION, make_config

INFER_KEY = "infer-key-1"  # the policy server's key (tests/test_policy_server.py)
KEYS = f"alice-key feedback; bob-key feedback; {INFER_KEY} infer"
SPEC = EncodingSpec()  # what the reward server uses for a model directory without a manifest


def start_workbench_gateway(
    bootstrap: str, workbench: WorkbenchConfig, api_keys: str = KEYS
) -> tuple[ServerRuntime, str]:
    """A feedback gateway with the workbench; returns its runtime and HTTP base URL."""
    config = FeedbackServerConfig(
        kafka=KafkaConfig(bootstrap_servers=bootstrap),
        resolver=ResolverConfig(wait_s=5.0),
        runtime=FeedbackRuntimeConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            http_host="127.0.0.1",
            http_port=0,
            api_keys=api_keys,
            grace_s=2,
        ),
        startup_timeout_s=60,
        workbench=workbench,
    )
    runtime = ServerRuntime(config.runtime, CollectorRegistry(), component="feedback")
    runtime.start_in_thread(add_servicers(config, runtime.registry, runtime), SERVICES)
    assert runtime.wait_serving("rlhf.v1.FeedbackService", 60)  # its index read from Kafka
    return runtime, f"http://127.0.0.1:{runtime.http_port}"


def served(prompt: str, texts: list[str], *, version: str = "policy-v1", user: str = "user-1",
           created_at_ms: int | None = None) -> events_pb2.ServedGeneration:  # fmt: skip
    """A served request as the policy server publishes it to rlhf.prompts."""
    run = uuid.uuid4().hex[:10]
    return events_pb2.ServedGeneration(
        event_id=run,
        created_at_ms=created_at_ms or int(time.time() * 1000),
        request_id=f"req-{run}",
        prompt=prompt,
        model_version=version,
        user_id=user,
        samples=[
            events_pb2.GeneratedSample(generation_id=f"{run}-{i}", text=t, token_ids=[1, 2])
            for i, t in enumerate(texts)
        ],
    )


def publish(bootstrap: str, *generations: events_pb2.ServedGeneration) -> None:
    producer = bus.Producer(bootstrap, client_id="test-served")
    for generation in generations:
        producer.send_sync(topics.PROMPTS, generation, key=generation.request_id)
    producer.close()


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def wait_for(check: Any, what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    kafka = start_broker(tmp_path_factory.mktemp("workbench-kafka"))
    yield kafka
    kafka.stop()


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workbench-rm")
    rm, tok = reward_model_from_policy(build_tiny(root / "policy", seed=0))
    with torch.no_grad():  # a seeded random head: rewards differ per text
        rm.head.weight.copy_(
            torch.randn(rm.head.weight.shape, generator=torch.Generator().manual_seed(1))
        )
    return rm.save(root / "rm-wb", tok)


@pytest.fixture(scope="module")
def reward(rm_dir: Path) -> Iterator[str]:
    config = RewardServerConfig(
        model=ModelConfig(path=str(rm_dir), device="cpu"),
        runtime=RewardRuntimeConfig(
            host="127.0.0.1", port=0, metrics_port=-1, http_port=-1, api_keys=f"{INFER_KEY} infer"
        ),
    )
    server = RewardServer(config, CollectorRegistry())
    server.start_in_thread()
    yield f"127.0.0.1:{server.runtime.port}"
    server.stop_in_thread()


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory, broker: LocalKafka) -> Iterator[str]:
    model = build_tiny(tmp_path_factory.mktemp("workbench-policy") / "tiny", seed=0)
    config = make_config(model, broker.bootstrap_servers)
    server = PolicyServer(config, CollectorRegistry())
    server.start_in_thread()
    yield f"127.0.0.1:{server.runtime.port}"
    server.stop_in_thread()


@dataclass
class Gateway:
    url: str
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def gateway(broker: LocalKafka, reward: str, policy: str) -> Iterator[Gateway]:
    workbench = WorkbenchConfig(
        order="uncertainty",
        reward_target=reward,
        policy_target=policy,
        api_key=INFER_KEY,
        overlap=0.0,
        max_new_tokens=12,
    )
    runtime, url = start_workbench_gateway(broker.bootstrap_servers, workbench)
    yield Gateway(url, runtime.registry)
    runtime.stop_in_thread()


def labeler_id(key: str) -> str:
    return "labeler-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def queued(url: str, key: str, prefix: str, count: int) -> dict[str, Any]:
    """The queue as ``key`` sees it, once it lists ``count`` tasks whose prompt starts with
    ``prefix`` (the gateway reads rlhf.prompts in the background)."""

    def listed() -> dict[str, Any] | None:
        reply = httpx2.get(f"{url}/v1/workbench/queue?limit=200", headers=auth(key))
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        ours = [t for t in body["tasks"] if t["prompt"].startswith(prefix)]
        return body if len(ours) >= count else None

    result: dict[str, Any] = wait_for(listed, f"{count} tasks of {prefix}")
    return result


def test_uncertainty_order_follows_the_reward_models_own_scores(
    broker: LocalKafka, gateway: Gateway, rm_dir: Path
) -> None:
    run = f"[{uuid.uuid4().hex[:6]}]"
    now = int(time.time() * 1000)
    words = ("river", "stone", "cloud", "ember")
    generations = [
        served(f"{run} Describe thing {i}.", [f"{w} {i} {w[::-1]}" for w in words],
               created_at_ms=now - 1000 * (5 - i))
        for i in range(5)
    ]  # fmt: skip
    publish(broker.bootstrap_servers, *generations)
    body = queued(gateway.url, "alice-key", run, 5)
    assert body["order"] == "uncertainty"
    ours = [t for t in body["tasks"] if t["prompt"].startswith(run)]

    model, tok = load_reward_model(rm_dir)
    gaps = {}
    for task in ours:
        texts = [r["text"] for r in task["responses"]]
        want = score(model, tok, SPEC, [task["prompt"]] * len(texts), texts)
        got = torch.tensor([r["reward"] for r in task["responses"]])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        gaps[task["task_id"]] = top_two_gap(want.tolist())
        assert task["reward_gap"] == pytest.approx(gaps[task["task_id"]], abs=1e-4)
        assert task["reward_model_version"] == "rm-wb"
        assert task["source"] == "traffic" and task["k"] == 4
    # The RM's least certain prompt first: top two rewards closest.
    assert [t["task_id"] for t in ours] == sorted(gaps, key=gaps.__getitem__)
    assert len(set(gaps.values())) == 5
    # And that is the task the labeler gets next.
    first = body["tasks"][0]["task_id"]
    handed = httpx2.post(
        f"{gateway.url}/v1/workbench/tasks/next", json={}, headers=auth("alice-key")
    )
    assert handed.json()["task"]["task_id"] == first


def test_a_chat_conversation_is_a_task_and_its_ranking_keeps_the_turns(
    broker: LocalKafka, gateway: Gateway
) -> None:
    run = f"[{uuid.uuid4().hex[:6]}]"
    turns = [("system", "Answer in one word."), ("user", f"{run} Best color?")]
    generation = served("", ["Blue.", "Red.", "Green.", "Gold."], user="user-chat")
    generation.messages.extend(inference_pb2.ChatMessage(role=r, content=c) for r, c in turns)
    publish(broker.bootstrap_servers, generation)

    def listed() -> dict[str, Any] | None:
        reply = httpx2.get(f"{gateway.url}/v1/workbench/queue?limit=200", headers=auth("alice-key"))
        return next((t for t in reply.json()["tasks"] if run in str(t["messages"])), None)

    task = wait_for(listed, "the chat task")
    assert task["prompt"] == "" and [(m["role"], m["content"]) for m in task["messages"]] == turns
    # This reward model has no chat template: the task is not scored, and it says why.
    assert task["reward_gap"] is None and task["unscored"]
    ranking = [{"generation_id": r["generation_id"], "rank": 1 if r["text"] == "Blue." else 2}
               for r in task["responses"]]  # fmt: skip
    reply = httpx2.post(f"{gateway.url}/v1/workbench/tasks/{task['task_id']}/submit",
                        json={"ranking": ranking}, headers=auth("alice-key"), timeout=30)  # fmt: skip
    assert reply.status_code == 200, reply.text
    [event] = [
        r.value for r in read_events(broker.bootstrap_servers, [topics.COMPARISONS])
        if r.value.event_id == reply.json()["comparison"]["event_id"]  # type: ignore[attr-defined]
    ]  # fmt: skip
    assert isinstance(event, events_pb2.ComparisonEvent)
    assert event.prompt == "" and [(m.role, m.content) for m in event.messages] == turns
    assert {r.text: r.rank for r in event.responses} == {
        "Blue.": 1,
        "Red.": 2,
        "Green.": 2,
        "Gold.": 2,
    }
    assert event.user_id == "user-chat"


def test_a_task_generated_on_demand_carries_real_generation_ids_and_judgements_reach_kafka_once(
    broker: LocalKafka, gateway: Gateway, policy: str
) -> None:
    # An application asks for one response: too few to rank, so its prompt waits for a
    # generation of n = K on demand, under the same user id.
    prompt = f"[{uuid.uuid4().hex[:6]}] Tell me about rivers."
    with grpc.insecure_channel(policy) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        stub.Generate(
            inference_pb2.GenerateRequest(prompt=prompt, n=1, user_id="user-77"),
            metadata=[("authorization", f"Bearer {INFER_KEY}")],
            timeout=60,
        )

    # Bob skips what traffic left in the queue until the queue generates a task.
    def generated() -> dict[str, Any] | None:
        reply = httpx2.post(
            f"{gateway.url}/v1/workbench/tasks/next", json={}, headers=auth("bob-key"), timeout=60
        )
        assert reply.status_code == 200, reply.text
        task: dict[str, Any] | None = reply.json()["task"]
        if task is not None and task["source"] == "generated":
            return task
        if task is not None:
            httpx2.post(
                f"{gateway.url}/v1/workbench/tasks/{task['task_id']}/skip", headers=auth("bob-key")
            )
        return None

    added = gateway.metric("rlhf_feedback_labeling_tasks_added_total", source="generated")
    task = wait_for(generated, "a task generated on demand")
    assert task["prompt"] == prompt and task["k"] == 4
    assert (
        gateway.metric("rlhf_feedback_labeling_tasks_added_total", source="generated") == added + 1
    )
    ids = [r["generation_id"] for r in task["responses"]]
    served_records = [
        r.value for r in read_events(broker.bootstrap_servers, [topics.PROMPTS])
        if isinstance(r.value, events_pb2.ServedGeneration) and r.value.prompt == prompt
    ]  # fmt: skip
    by_id = {s.generation_id: g for g in served_records for s in g.samples}
    assert set(ids) <= set(by_id)
    assert {by_id[i].user_id for i in ids} == {"user-77"}
    assert {len(by_id[i].samples) for i in ids} == {4}  # one request of n = K

    ranking = [
        {"generation_id": ids[0], "rank": 2, "quality": 5, "flags": ["HALLUCINATION"]},
        {"generation_id": ids[1], "rank": 1, "quality": 7},
        {"generation_id": ids[2], "rank": 3, "flags": ["RESPONSE_FLAG_CONTAINS_PII", "FAILS_TO_FOLLOW_INSTRUCTION"]},
        {"generation_id": ids[3], "rank": 2, "quality": 1},
    ]  # fmt: skip
    url = f"{gateway.url}/v1/workbench/tasks/{task['task_id']}/submit"
    stored_before = gateway.metric("rlhf_feedback_labeling_submissions_total", kind="ranking")
    first = httpx2.post(url, json={"ranking": ranking}, headers=auth("bob-key"), timeout=30)
    assert first.status_code == 200, first.text
    again = httpx2.post(url, json={"ranking": ranking}, headers=auth("bob-key"), timeout=30)
    ack, repeat = first.json()["comparison"], again.json()["comparison"]
    assert ack["duplicate"] is False and repeat == {**ack, "duplicate": True}
    assert first.json()["today"]["rankings"] >= 1
    assert (
        gateway.metric("rlhf_feedback_labeling_submissions_total", kind="ranking")
        == stored_before + 1
    )

    key = idempotency_key(task["task_id"], labeler_id("bob-key"), "ranking")
    assert ack["event_id"] == event_id_for("comparison", key)
    records = [
        r.value for r in read_events(broker.bootstrap_servers, [topics.COMPARISONS])
        if r.value.event_id == ack["event_id"]  # type: ignore[attr-defined]
    ]  # fmt: skip
    assert len(records) == 1  # the retry wrote nothing
    event = records[0]
    assert isinstance(event, events_pb2.ComparisonEvent)
    assert (event.labeler_id, event.user_id, event.idempotency_key) == (
        labeler_id("bob-key"),
        "user-77",
        key,
    )
    assert [r.generation_id for r in event.responses] == ids
    assert [r.rank for r in event.responses] == [2, 1, 3, 2]
    assert [r.quality for r in event.responses] == [5, 7, 0, 1]
    flag = events_pb2.ResponseFlag.Value
    assert [list(r.flags) for r in event.responses] == [
        [flag("RESPONSE_FLAG_HALLUCINATION")], [],
        [flag("RESPONSE_FLAG_CONTAINS_PII"), flag("RESPONSE_FLAG_FAILS_TO_FOLLOW_INSTRUCTION")], [],
    ]  # fmt: skip
    assert {r.model_version for r in event.responses} == {VERSION}
    assert all(len(r.token_ids) > 0 for r in event.responses)


def test_bad_submissions_are_refused_by_name_and_store_nothing(
    broker: LocalKafka, gateway: Gateway
) -> None:
    run = f"[{uuid.uuid4().hex[:6]}]"
    publish(broker.bootstrap_servers, served(f"{run} Pick one.", ["red", "green", "blue", "gold"]))
    body = queued(gateway.url, "alice-key", run, 1)
    task = next(t for t in body["tasks"] if t["prompt"].startswith(run))
    ids = [r["generation_id"] for r in task["responses"]]
    url = f"{gateway.url}/v1/workbench/tasks/{task['task_id']}/submit"

    def ranked(*ranks: int, **extra: Any) -> list[dict[str, Any]]:
        return [{"generation_id": i, "rank": r, **extra} for i, r in zip(ids, ranks, strict=True)]

    cases: list[tuple[dict[str, Any], int, str]] = [
        ({}, 400, "give a ranking, a demonstration, or both"),
        ({"ranking": ranked(1, 2, 3, 4)[:3]}, 400, "3 entries for the task's 4 responses"),
        ({"ranking": [{"generation_id": "nope", "rank": 1}, *ranked(1, 2, 3, 4)[1:]]}, 400, "'nope' is not a response of this task"),
        ({"ranking": [*ranked(1, 2, 3, 4)[:3], ranked(1, 2, 3, 4)[0]]}, 400, "is given twice"),
        ({"ranking": ranked(1, 2, 3, 4, quality=8)}, 400, "responses[0].quality: 8; the quality score runs 1..7"),
        ({"ranking": ranked(1, 2, 3, 4, flags=["NOPE"])}, 400, "ranking[0].flags[0]: 'NOPE' is not a known flag"),
        ({"ranking": ranked(1, 2, 3, 4, flags=["HALLUCINATION", "HALLUCINATION"])}, 400, "given twice"),
        ({"ranking": ranked(1, 1, 1, 1)}, 400, "every response is tied"),
        ({"ranking": ranked(1, 2, 3, 5)}, 400, "ranking[3].rank"),
        ({"ranking": ranked(1, 2, 3, 4), "demonstration": "   "}, 400, "response: must not be empty"),
        ({"ranking": ranked(1, 2, 3, 4), "extra": 1}, 400, "Unrecognized request argument supplied: extra"),
    ]  # fmt: skip
    for body_, status, message in cases:
        reply = httpx2.post(url, json=body_, headers=auth("alice-key"), timeout=30)
        assert reply.status_code == status, (body_, reply.text)
        assert message in reply.json()["error"]["message"], (body_, reply.text)
    missing = httpx2.post(
        f"{gateway.url}/v1/workbench/tasks/feedface/submit", json={}, headers=auth("alice-key")
    )
    assert missing.status_code == 404 and "unknown or expired" in missing.text
    key = idempotency_key(task["task_id"], labeler_id("alice-key"), "ranking")
    stored = {r.value.event_id for r in read_events(broker.bootstrap_servers, [topics.COMPARISONS])}  # type: ignore[attr-defined]
    assert event_id_for("comparison", key) not in stored


def test_keys_the_page_and_agreement_between_two_labelers(
    broker: LocalKafka, gateway: Gateway
) -> None:
    page = httpx2.get(f"{gateway.url}/workbench/")
    assert page.status_code == 200 and "Labeling workbench" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert (
        httpx2.get(f"{gateway.url}/workbench/workbench.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )
    assert httpx2.get(f"{gateway.url}/workbench/../server.py").status_code == 404
    me = f"{gateway.url}/v1/workbench/me"
    assert httpx2.get(me).status_code == 401
    assert httpx2.get(me, headers=auth("wrong-key")).status_code == 401
    denied = httpx2.get(me, headers=auth(INFER_KEY))
    assert denied.status_code == 403 and "lacks scope 'feedback'" in denied.text

    run = f"[{uuid.uuid4().hex[:6]}]"
    publish(broker.bootstrap_servers, served(f"{run} Rank these.", ["a1", "b2", "c3", "d4"]))
    task = next(
        t for t in queued(gateway.url, "alice-key", run, 1)["tasks"] if t["prompt"].startswith(run)
    )
    by_text = {r["text"]: r["generation_id"] for r in task["responses"]}
    before = {k: httpx2.get(me, headers=auth(k)).json() for k in ("alice-key", "bob-key")}
    # Alice: a > b > c > d. Bob: a > (c = d) > b. Pairs both order: ab, ac, ad agree; bc, bd
    # disagree; cd is tied by Bob, so no comparison: 3 of 5.
    for key, ranks in (("alice-key", {"a1": 1, "b2": 2, "c3": 3, "d4": 4}),
                       ("bob-key", {"a1": 1, "b2": 3, "c3": 2, "d4": 2})):  # fmt: skip
        ranking = [{"generation_id": by_text[t], "rank": r} for t, r in ranks.items()]
        reply = httpx2.post(f"{gateway.url}/v1/workbench/tasks/{task['task_id']}/submit",
                            json={"ranking": ranking, "demonstration": f"{key} would say a1."},
                            headers=auth(key), timeout=30)  # fmt: skip
        assert reply.status_code == 200, reply.text
        assert reply.json()["demonstration"]["duplicate"] is False
    after = {k: httpx2.get(me, headers=auth(k)).json() for k in ("alice-key", "bob-key")}
    for key in ("alice-key", "bob-key"):
        old, new = before[key]["agreement"], after[key]["agreement"]
        assert (new["agreed"] - old["agreed"], new["compared"] - old["compared"]) == (3, 5)
        assert after[key]["today"]["tasks"] == before[key]["today"]["tasks"] + 1
        assert after[key]["today"]["demonstrations"] == before[key]["today"]["demonstrations"] + 1
        assert after[key]["labeler_id"] == labeler_id(key)
    overall = after["alice-key"]["overall_agreement"]
    assert overall["compared"] - before["alice-key"]["overall_agreement"]["compared"] == 5
    assert gateway.metric("rlhf_feedback_labeler_agreement_comparisons") == overall["compared"]
    assert gateway.metric("rlhf_feedback_labeler_agreement_ratio") == pytest.approx(
        overall["ratio"]
    )
