"""Rounds against a real broker: a passing round publishes the checkpoint, then the model
event, then commits; a failed gate publishes and commits nothing; an unreachable models
topic leaves a published checkpoint whose event is sent on restart, and nothing is retrained."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from prometheus_client import CollectorRegistry

from rlhf import bus, checkpoint, encoding, models
from rlhf.kafka_local import free_port
from rlhf.seed import seed_registry
from rlhf.streams import StreamsConfig
from rlhf.v1 import events_pb2
from tests.trainer_support import Process
from trainer.config import (
    DataConfig,
    GatesConfig,
    PPOConfig,
    ScheduleConfig,
    SFTConfig,
    TrainerConfig,
)
from trainer.corpus import PretrainCorpus
from trainer.data import TrainingData
from trainer.main import run
from trainer.metrics import TrainerMetrics
from trainer.reader import StreamReader, StreamTopics
from trainer.registry import policy_dir, reference_dir, trained_rm
from trainer.rounds import Trainer
from trainer.sft import sft_eval

CORPUS = Path(__file__).resolve().parents[1] / "data" / "pretrain.txt"
TRAIN, VAL = events_pb2.SPLIT_TRAIN, events_pb2.SPLIT_VALIDATION


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    models.init_models(models.InitConfig(out=str(out)))
    return out


def setup_stream(
    kafka, tmp_path: Path, base: Path, **overrides
) -> tuple[TrainerConfig, StreamTopics]:
    prefix = f"rounds-{uuid.uuid4().hex[:6]}."
    topics = StreamTopics.with_prefix(prefix)
    bus.ensure_topics(kafka.bootstrap_servers, [*topics.inputs(), topics.models])
    fields = dict(
        bootstrap_servers=kafka.bootstrap_servers, group_id=prefix, streams=StreamsConfig(topic_prefix=prefix),
        registry=tmp_path / "registry", base_model=base, pretrain_corpus=CORPUS, device="cpu",
        metrics_port=0, progress="off", data=DataConfig(poll_timeout_s=0.2),
        sft=SFTConfig(epochs=1, batch_size=8),
    )  # fmt: skip
    fields.update(overrides)
    return TrainerConfig(**fields), topics  # type: ignore[arg-type]


def produce_demos(kafka, topics: StreamTopics, n: int, split: int = TRAIN) -> None:
    producer = bus.Producer(kafka.bootstrap_servers, client_id="test-rounds")
    for i in range(n):
        event = events_pb2.DemonstrationEvent(
            event_id=uuid.uuid4().hex, prompt=f"{i:04d} {uuid.uuid4().hex[:6]} say something",
            response="the river runs past the mill", user_id=f"u{i % 4}", split=split,  # type: ignore[arg-type]
        )  # fmt: skip
        producer.send(topics.demonstrations, event, key=event.user_id)
    producer.close()


def committed(kafka, group: str) -> dict[tuple[str, int], int]:
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {(tp.topic, tp.partition): om.offset for tp, om in offsets.items() if om.offset >= 0}


def model_events(
    kafka, topics: StreamTopics, want: int, timeout_s: float = 15.0
) -> list[events_pb2.ModelEvent]:
    consumer = bus.Consumer(kafka.bootstrap_servers, [topics.models], group_id=uuid.uuid4().hex,
                            client_id="test-events")  # fmt: skip
    out: list[events_pb2.ModelEvent] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(out) < want:
            out += [r.value for r in consumer.poll(timeout_s=0.5)]  # type: ignore[misc]
        # Anything beyond `want` would be a duplicate: read on a little to catch it.
        out += [r.value for r in consumer.poll(timeout_s=1.0)]  # type: ignore[misc]
    finally:
        consumer.close()
    return out


def test_a_passing_round_publishes_checkpoint_then_event_then_commits(kafka, tmp_path, base):
    cfg, topics = setup_stream(
        kafka, tmp_path, base, schedule=ScheduleConfig(sft_min_new=16, max_rounds=1)
    )
    produce_demos(kafka, topics, 16)
    seen: list[tuple[str, bool]] = []

    def watch() -> None:
        # When the event arrives, its checkpoint must already be complete and verifiable.
        for event in model_events(kafka, topics, want=2, timeout_s=90):
            path = event.path or cfg.registry / "policy" / event.version  # PROMOTED names no path
            ok = checkpoint.verify(path).version == event.version
            seen.append((events_pb2.ModelEventKind.Name(event.kind), event.version, ok))

    watcher = threading.Thread(target=watch)
    watcher.start()
    registry = CollectorRegistry()
    run(cfg, registry=registry, serve_metrics=False)
    watcher.join()

    path = checkpoint.latest(cfg.registry, "policy")
    manifest = checkpoint.verify(path)
    assert manifest.round_type == "sft" and manifest.parent is None
    assert manifest.metrics["examples"] == 16
    assert seen == [
        ("MODEL_EVENT_KIND_PUBLISHED", manifest.version, True),
        ("MODEL_EVENT_KIND_PROMOTED", manifest.version, True),
    ]
    # Committed offsets are the manifest's: all 16 demonstrations are consumed.
    demo_offsets = {
        k: v for k, v in manifest.partition_offsets().items() if k[0] == topics.demonstrations.name
    }
    assert sum(demo_offsets.values()) == 16
    assert committed(kafka, cfg.group_id) == manifest.partition_offsets()
    sample = registry.get_sample_value
    assert sample("rlhf_trainer_rounds_total", {"type": "sft", "outcome": "published"}) == 1
    assert sample("rlhf_trainer_checkpoints_published_total", {"role": "policy"}) == 1
    assert sample("rlhf_trainer_last_checkpoint_timestamp_seconds", {"role": "policy"}) > 0


def test_a_failed_gate_publishes_nothing_and_commits_nothing(kafka, tmp_path, base):
    cfg, topics = setup_stream(
        kafka, tmp_path, base,
        ppo=PPOConfig(episodes=16, minibatch_size=8, iterations=1, gamma_ptx=1.0, ptx_ratio=1, lr=1e-2,
                      warmup_iters=0, ema_decay=0.0),
        gates=GatesConfig(kl_budget=1e-9, min_val_prompts=8, eval_prompts=16),
        schedule=ScheduleConfig(ppo_min_new=16, ppo_needs_rm=False, max_rounds=1),
    )  # fmt: skip
    producer = bus.Producer(kafka.bootstrap_servers, client_id="test-rounds")
    for i in range(32):
        served = events_pb2.ServedGeneration(event_id=uuid.uuid4().hex, prompt=f"{i:03d} tell me",
                                             user_id=f"u{i}", split=VAL if i % 2 else TRAIN)  # fmt: skip
        producer.send(topics.prompts, served, key=served.user_id)
    producer.close()
    registry = CollectorRegistry()
    trainer = run(cfg, registry=registry, serve_metrics=False)

    assert trainer.rounds_run == 1
    assert checkpoint.list_versions(cfg.registry, "policy") == []
    assert committed(kafka, cfg.group_id) == {}
    assert model_events(kafka, topics, want=0, timeout_s=2) == []
    sample = registry.get_sample_value
    assert sample("rlhf_trainer_rounds_total", {"type": "ppo", "outcome": "gate_failed"}) == 1
    assert sample("rlhf_trainer_gate_failures_total", {"type": "ppo", "gate": "kl"}) == 1


def test_an_unacked_model_event_is_sent_on_restart_and_nothing_is_retrained(kafka, tmp_path, base):
    cfg, topics = setup_stream(
        kafka, tmp_path, base, schedule=ScheduleConfig(sft_min_new=8, max_rounds=1)
    )
    produce_demos(kafka, topics, 8)
    # The models topic is unreachable: this producer's broker does not exist.
    dead = bus.Producer(f"127.0.0.1:{free_port()}", client_id="dead", max_block_ms=500)
    consumer = bus.Consumer(kafka.bootstrap_servers, topics.inputs(), group_id=cfg.group_id,
                            client_id="test", start_offsets=StreamReader.start_offsets(topics, {}, True))  # fmt: skip
    reader = StreamReader(consumer, TrainingData(cfg.data), topics, {}, cfg.data)
    trainer = Trainer(cfg, reader=reader, producer=dead, metrics=TrainerMetrics(CollectorRegistry()),
                      stream_topics=topics, corpus=PretrainCorpus(CORPUS), device="cpu")  # fmt: skip
    while not reader.data.pending_demonstrations or len(reader.data.pending_demonstrations) < 8:
        reader.poll()
    result = trainer.run_round("sft")
    consumer.close()
    dead.close(timeout_s=1)

    assert result.outcome == "published"
    manifest = checkpoint.verify(checkpoint.latest(cfg.registry, "policy"))
    assert reader.data.pending_demonstrations == []  # in a published model: never again
    assert committed(kafka, cfg.group_id) == {}  # no event yet, so no commit either
    assert model_events(kafka, topics, want=0, timeout_s=2) == []

    # A restart announces the checkpoint and commits; the demonstrations are history now.
    stop = threading.Event()
    restarted = threading.Thread(target=run, args=(cfg,), kwargs=dict(registry=CollectorRegistry(),
                                 serve_metrics=False, stop=stop))  # fmt: skip
    restarted.start()
    try:
        events = model_events(kafka, topics, want=2, timeout_s=60)
        deadline = time.monotonic() + 30
        while (
            committed(kafka, cfg.group_id) != manifest.partition_offsets()
            and time.monotonic() < deadline
        ):
            stop.wait(0.2)
    finally:
        stop.set()
        restarted.join()
    assert [(e.kind, e.version) for e in events] == [
        (events_pb2.MODEL_EVENT_KIND_PUBLISHED, manifest.version),
        (events_pb2.MODEL_EVENT_KIND_PROMOTED, manifest.version),
    ]
    assert committed(kafka, cfg.group_id) == manifest.partition_offsets()
    assert checkpoint.list_versions(cfg.registry, "policy") == [manifest.version]


def test_rounds_start_from_a_seeded_registry_and_ppo_waits_for_a_trained_rm(tmp_path, base):
    registry = tmp_path / "registry"
    init_policy, init_reward = (m.version for m in seed_registry(registry, base, None))
    assert reference_dir(registry, base) == registry / "policy" / init_policy
    assert policy_dir(registry, base) == registry / "policy" / init_policy
    assert trained_rm(registry) is None  # an initial RM is not one learnt from feedback
    sft = checkpoint.publish(
        registry, "policy", base / "policy", round_type="sft", parent=init_policy
    )
    ppo = checkpoint.publish(
        registry, "policy", base / "policy", round_type="ppo", parent=sft.version
    )
    assert reference_dir(registry, base) == registry / "policy" / sft.version
    assert policy_dir(registry, base) == registry / "policy" / ppo.version
    rm = checkpoint.publish(
        registry, "reward", base / "reward", round_type="rm", parent=init_reward
    )
    assert trained_rm(registry) == registry / "reward" / rm.version


def test_sft_validation_scores_the_encoding_sft_trains_on(kafka, tmp_path, base):
    # Val demonstrations with responses longer than a PPO rollout: scored under the one
    # encoding SFT trains with (the old gate cut them to rollout length with an added EOS).
    cfg, topics = setup_stream(kafka, tmp_path, base)
    produce_demos(kafka, topics, 8)
    long = "the river runs past the mill and on to the sea, " * 4
    producer = bus.Producer(kafka.bootstrap_servers, client_id="test-rounds")
    val = [events_pb2.DemonstrationEvent(event_id=uuid.uuid4().hex, prompt=f"{i} tell a story",
                                         response=long, user_id="v", split=VAL) for i in range(4)]  # fmt: skip
    for event in val:
        producer.send(topics.demonstrations, event, key="v")
    producer.close()
    process = Process(cfg, topics, kafka)
    try:
        process.read(demos=8)
        while len(process.reader.data.demonstrations["val"]) < 4:
            process.reader.poll()
        manifest = process.round("sft")
    finally:
        process.close()
    path = cfg.registry / "policy" / manifest.version
    policy, tok = models.load_policy(path)
    spec = encoding.spec_for_model(path, tok)
    batch = encoding.encode_pairs(tok, spec, [e.prompt for e in val], [e.response for e in val])
    assert int(batch.response_mask.sum(dim=1).max()) > cfg.ppo.max_new_tokens
    assert manifest.metrics["val_sft_loss"] == pytest.approx(sft_eval(policy, batch), rel=1e-4)


def test_records_held_back_by_gates_too_often_are_parked_not_lost(kafka, tmp_path, base):
    # A learning rate that wrecks the model (every weight moves by ~1 per Adam step): every SFT
    # round on these records fails its val-loss gate.
    cfg, topics = setup_stream(
        kafka, tmp_path, base, sft=SFTConfig(epochs=1, batch_size=8, lr=1.0),
        gates=GatesConfig(sft_tolerance=0.0), schedule=ScheduleConfig(park_after_failures=2),
    )  # fmt: skip
    parked_topic = topics.parked("demonstrations")
    bus.ensure_topics(kafka.bootstrap_servers, [parked_topic])
    produce_demos(kafka, topics, 8)
    producer = bus.Producer(kafka.bootstrap_servers, client_id="test-rounds")
    for i in range(4):
        event = events_pb2.DemonstrationEvent(event_id=uuid.uuid4().hex, prompt=f"{i} zq",
                                              response="zqxj vkwq " * 4, user_id="v", split=VAL)  # fmt: skip
        producer.send(topics.demonstrations, event, key="v")
    producer.close()
    process = Process(cfg, topics, kafka)
    registry = CollectorRegistry()
    process.trainer.metrics = TrainerMetrics(registry)
    try:
        process.read(demos=8)
        while len(process.reader.data.demonstrations["val"]) < 4:
            process.reader.poll()
        pending = {d.event_id for d in process.reader.data.pending_demonstrations}
        assert process.trainer.run_round("sft").outcome == "gate_failed"
        assert {d.event_id for d in process.reader.data.pending_demonstrations} == pending
        assert process.trainer.run_round("sft").outcome == "gate_failed"
        assert process.reader.data.pending_demonstrations == []  # parked after 2 failures
    finally:
        process.close()
    assert registry.get_sample_value(
        "rlhf_trainer_records_parked_total", {"kind": "demonstrations"}
    ) == len(pending)
    # Nothing is lost: the very records are on <topic>.parked.
    consumer = bus.Consumer(kafka.bootstrap_servers, [parked_topic], group_id=uuid.uuid4().hex,
                            client_id="test-parked")  # fmt: skip
    parked: set[str] = set()
    deadline = time.monotonic() + 30
    try:
        while parked != pending and time.monotonic() < deadline:
            parked |= {r.value.event_id for r in consumer.poll(timeout_s=0.5)}  # type: ignore[attr-defined]
    finally:
        consumer.close()
    assert parked == pending
