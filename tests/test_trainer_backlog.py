"""Against a real broker: a backlog of any size drains in rounds (backpressure never blocks
history or other topics), a broken registry is retried with backoff, and a round that never
published leaves its records pending, PPO-ptx's served prompts included."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

from prometheus_client import CollectorRegistry

from rlhf import bus, checkpoint, models
from rlhf.streams import StreamsConfig
from tests.trainer_support import CORPUS, Process, produce
from trainer.config import (
    DataConfig,
    GatesConfig,
    PPOConfig,
    ScheduleConfig,
    SFTConfig,
    TrainerConfig,
)
from trainer.data import TrainingData
from trainer.main import run
from trainer.reader import StreamReader, StreamTopics


def config(kafka, tmp_path: Path, **overrides) -> tuple[TrainerConfig, StreamTopics]:
    if not (tmp_path / "base").is_dir():
        models.init_models(models.InitConfig(out=str(tmp_path / "base")))
    prefix = overrides.pop("prefix")
    fields = dict(
        bootstrap_servers=kafka.bootstrap_servers, group_id=prefix, streams=StreamsConfig(topic_prefix=prefix),
        registry=tmp_path / "registry", base_model=tmp_path / "base", pretrain_corpus=CORPUS,
        device="cpu", metrics_port=0, progress="off", sft=SFTConfig(epochs=1, batch_size=8),
        gates=GatesConfig(enabled=False),
    )  # fmt: skip
    fields.update(overrides)
    topics = StreamTopics.with_prefix(prefix)
    bus.ensure_topics(kafka.bootstrap_servers, [*topics.inputs(), topics.models])
    return TrainerConfig(**fields), topics  # type: ignore[arg-type]


def run_until(cfg: TrainerConfig, done, timeout_s: float, registry=None) -> bool:
    """Runs the trainer in a thread until ``done()`` or the timeout; True if done."""
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(cfg,), kwargs=dict(
        registry=registry or CollectorRegistry(), serve_metrics=False, stop=stop))  # fmt: skip
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and thread.is_alive():
            if done():
                return True
            stop.wait(0.5)
        return done()
    finally:
        stop.set()
        thread.join()


def examples(registry: Path) -> list[int]:
    return [
        int(checkpoint.read_manifest(registry / "policy" / v).metrics["examples"])
        for v in checkpoint.list_versions(registry, "policy")
    ]


def test_a_restart_with_a_backlog_beyond_the_bounds_drains_it_in_rounds(kafka, tmp_path):
    prefix = f"backlog-{uuid.uuid4().hex[:6]}."
    cfg, topics = config(kafka, tmp_path, prefix=prefix,
                         schedule=ScheduleConfig(sft_min_new=12, max_rounds=1))  # fmt: skip
    # History on every partition, below the resume offsets of a first checkpoint.
    produce(kafka, topics, demos=12, keys=tuple(f"u{i}" for i in range(12)))
    run(cfg, registry=CollectorRegistry(), serve_metrics=False)
    assert examples(cfg.registry) == [12]
    # Then a backlog far beyond data.max_demonstrations, all on one partition.
    produce(kafka, topics, demos=40, keys=("flood",))
    bounded, _ = config(kafka, tmp_path, prefix=prefix,
                        data=DataConfig(max_demonstrations=8, poll_max_records=4, poll_timeout_s=0.2),
                        schedule=ScheduleConfig(sft_min_new=8))  # fmt: skip
    drained = run_until(bounded, lambda: sum(examples(cfg.registry)) >= 52, timeout_s=150)
    counts = examples(cfg.registry)
    assert drained, counts
    # Every record in exactly one checkpoint, no round beyond the bound.
    assert sum(counts) == 52 and max(counts[1:]) <= 8, counts


def test_a_full_kind_pauses_its_own_topic_only(kafka, tmp_path):
    prefix = f"pause-{uuid.uuid4().hex[:6]}."
    cfg, topics = config(kafka, tmp_path, prefix=prefix,
                         data=DataConfig(max_demonstrations=4, poll_max_records=3, poll_timeout_s=0.2))  # fmt: skip
    produce(kafka, topics, demos=20, prompts=10)
    consumer = bus.Consumer(kafka.bootstrap_servers, topics.inputs(), group_id=prefix, client_id="t",
                            start_offsets=StreamReader.start_offsets(topics, {}, True))  # fmt: skip
    reader = StreamReader(consumer, TrainingData(cfg.data), topics, {}, cfg.data)
    data = reader.data
    try:
        deadline = time.monotonic() + 60
        while (len(data.pending_prompts), len(data.pending_demonstrations)) != (10, 4):
            assert time.monotonic() < deadline, (
                len(data.pending_prompts),
                len(data.pending_demonstrations),
            )
            reader.poll()
        for _ in range(5):
            reader.poll()
        assert len(data.pending_prompts) == 10  # the prompts topic is read on
        assert len(data.pending_demonstrations) == 4  # the demonstrations wait in Kafka
        key = (topics.demonstrations.name, data.pending_demonstrations[0].source.partition)
        assert key in consumer.paused() and consumer.positions()[key] == 4
        # A round makes room: reading resumes exactly where it stopped.
        data.mark_trained("demonstrations", [d.event_id for d in data.pending_demonstrations])
        while len(data.pending_demonstrations) < 4 and time.monotonic() < deadline:
            reader.poll()
        assert [d.source.offset for d in data.pending_demonstrations] == [4, 5, 6, 7]
    finally:
        consumer.close()


def test_a_broken_registry_is_retried_with_backoff_not_in_a_tight_loop(kafka, tmp_path, caplog):
    prefix = f"broken-{uuid.uuid4().hex[:6]}."
    cfg, topics = config(kafka, tmp_path, prefix=prefix,
                         schedule=ScheduleConfig(sft_min_new=8, error_backoff_s=1.0))  # fmt: skip
    # Publishing fails like on a full or read-only volume: the role directory cannot be made.
    cfg.registry.mkdir()
    (cfg.registry / "policy").write_text("not a directory")
    produce(kafka, topics, demos=8)
    registry = CollectorRegistry()

    def errors() -> float:
        value = registry.get_sample_value(
            "rlhf_trainer_rounds_total", {"type": "sft", "outcome": "error"}
        )
        return value or 0.0

    with caplog.at_level(logging.INFO, logger="trainer"):
        run_until(cfg, lambda: False, timeout_s=9, registry=registry)
    # Tries at about 0, 1, 3 and 7 s (the wait doubles), where the old loop made dozens.
    assert 2 <= errors() <= 5, errors()
    failures = [
        r for r in caplog.records if r.name == "trainer.rounds" and r.levelno >= logging.ERROR
    ]
    assert len(failures) == errors()
    assert sum(r.exc_info is not None for r in failures) == 1  # one traceback, then one line each
    assert "in a row" in failures[-1].getMessage()


def test_a_ppo_round_that_never_published_runs_again_after_a_restart(kafka, tmp_path):
    prefix = f"ppokill-{uuid.uuid4().hex[:6]}."
    cfg, topics = config(kafka, tmp_path, prefix=prefix,
                         ppo=PPOConfig(episodes=8, minibatch_size=8, iterations=1, gamma_ptx=1.0,
                                       ptx_ratio=1, ema_decay=0.0, max_new_tokens=8),
                         schedule=ScheduleConfig(sft_min_new=8, ppo_min_new=16, ppo_needs_rm=False,
                                                 max_rounds=1))  # fmt: skip
    produce(kafka, topics, demos=8, prompts=16, val=8)
    first = Process(cfg, topics, kafka)
    first.read(demos=8, prompts=16 + 8)
    first.round("sft")  # its offsets are past the served prompts it read
    first.trainer.stop.set()  # killed while the PPO round trains: nothing of it is published
    assert first.trainer.run_round("ppo").outcome == "aborted"
    first.close()
    assert [checkpoint.read_manifest(cfg.registry / "policy" / v).round_type
            for v in checkpoint.list_versions(cfg.registry, "policy")] == ["sft"]  # fmt: skip

    def ppo_published() -> bool:
        latest = checkpoint.latest(cfg.registry, "policy")
        return latest is not None and checkpoint.read_manifest(latest).round_type == "ppo"

    # The restart finds the 16 served prompts pending again and runs the PPO-ptx round.
    assert run_until(cfg, ppo_published, timeout_s=120)
    served = [t for t in checkpoint.read_manifest(checkpoint.latest(cfg.registry, "policy")).offsets
              if t.startswith(topics.prompts.name)]  # fmt: skip
    assert served
