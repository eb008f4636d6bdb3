"""``rlhf kafka topics`` and ``rlhf model seed`` against a bare broker (no topics): seeding
refuses before writing anything, the topics command creates what is missing, and seeding is
idempotent: a run that failed half-way is repaired by running it again, and a run on a live
system never moves serving back to the base model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf import bus, checkpoint, models, topics
from rlhf.kafka_local import LocalKafka, free_port
from rlhf.kafka_local import main as kafka_main
from rlhf.lifecycle import Kind, ModelFollower, published_events
from rlhf.models import main as model_main
from rlhf.seed import seed_registry
from rlhf.v1 import events_pb2
from tests.test_feedback_gateway import read_events


@pytest.fixture
def bare_kafka(tmp_path: Path) -> Iterator[LocalKafka]:
    broker = LocalKafka(tmp_path / "kafka", port=free_port(), controller_port=free_port())
    broker.start()
    yield broker
    broker.stop()


def model_events(bootstrap: str) -> list[events_pb2.ModelEvent]:
    records = read_events(bootstrap, [topics.MODELS])
    # The models topic is compacted and keyed by event id (events.proto says so): compaction
    # must never drop an event.
    assert all(r.key == r.value.event_id for r in records)  # type: ignore[attr-defined]
    return [r.value for r in records]  # type: ignore[misc]


def test_topics_then_seed_is_idempotent(bare_kafka: LocalKafka, tmp_path: Path, capsys) -> None:
    bootstrap = bare_kafka.bootstrap_servers
    base, registry = tmp_path / "base", tmp_path / "registry"
    models.init_models(models.InitConfig(out=str(base)))
    seed = ["seed", "--registry", str(registry), "--base", str(base),
            "--bootstrap-servers", bootstrap, "--timeout-s", "20"]  # fmt: skip

    # No topics yet: seeding refuses and writes nothing.
    assert model_main(seed) == 1
    assert "rlhf kafka topics --bootstrap-servers" in capsys.readouterr().out
    assert not registry.exists()

    assert kafka_main(["topics", "--bootstrap-servers", bootstrap]) == 0
    assert "rlhf.models" in capsys.readouterr().out
    assert bus.missing_topics(bootstrap, topics.ALL) == []
    assert kafka_main(["topics", "--bootstrap-servers", bootstrap]) == 0
    assert "every topic exists" in capsys.readouterr().out

    # A seed that wrote the registry but announced nothing (as a run that failed to announce).
    written = {m.role: m.version for m in seed_registry(registry, base, None)}
    assert model_main(seed) == 0
    capsys.readouterr()
    assert model_main(seed) == 0  # and again: nothing more is sent
    events = model_events(bootstrap)
    kinds = Counter((Kind.Name(e.kind), e.version) for e in events)
    for version in written.values():
        assert kinds[("MODEL_EVENT_KIND_PUBLISHED", version)] == 1
        assert kinds[("MODEL_EVENT_KIND_PROMOTED", version)] == 1
    assert len(events) == 4
    assert [checkpoint.list_versions(registry, role) for role in ("policy", "reward")] == [
        [written["policy"]], [written["reward"]]
    ]  # fmt: skip

    # A live system has promoted a newer policy: seeding again must not move serving back.
    newer = checkpoint.publish(
        registry, "policy", base / "policy", round_type="ppo", parent=written["policy"],
        metrics={}, offsets={},
    )  # fmt: skip
    producer = bus.Producer(bootstrap, client_id="seed-test")
    try:
        for event in published_events(newer, registry / "policy" / newer.version,
                                      auto_promote=True, actor="test"):  # fmt: skip
            producer.send_sync(topics.MODELS, event, key=event.event_id)
    finally:
        producer.close()
    assert model_main(seed) == 0
    assert len(model_events(bootstrap)) == 6
    follower = ModelFollower(bootstrap_servers=bootstrap, registry_dir=None)
    follower.start()
    try:
        assert follower.states[events_pb2.MODEL_ROLE_POLICY].promoted == newer.version
    finally:
        follower.stop()


def test_seed_says_when_kafka_cannot_be_reached(tmp_path: Path, capsys) -> None:
    base = tmp_path / "base"
    models.init_models(models.InitConfig(out=str(base)))
    args = ["seed", "--registry", str(tmp_path / "registry"), "--base", str(base),
            "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--timeout-s", "3"]  # fmt: skip
    assert model_main(args) == 1
    assert "cannot reach Kafka" in capsys.readouterr().out
    assert not (tmp_path / "registry").exists()
