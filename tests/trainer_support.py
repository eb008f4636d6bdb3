"""What the trainer tests share: producing records and driving a trainer in-process."""

from __future__ import annotations

import uuid
from pathlib import Path

from prometheus_client import CollectorRegistry

from rlhf import bus, checkpoint
from rlhf.v1 import events_pb2
from trainer.config import TrainerConfig
from trainer.corpus import PretrainCorpus
from trainer.data import TrainingData
from trainer.main import resume_offsets
from trainer.metrics import TrainerMetrics
from trainer.reader import StreamReader, StreamTopics
from trainer.rounds import Trainer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "pretrain.txt"
TRAIN, VAL = events_pb2.SPLIT_TRAIN, events_pb2.SPLIT_VALIDATION


def produce(
    kafka,
    topics: StreamTopics,
    *,
    demos: int = 0,
    prompts: int = 0,
    val: int = 0,
    keys: tuple[str, ...] = ("writer",),
) -> None:
    """Demonstrations (keyed round-robin by ``keys``: the keys choose the partitions) and
    train then val served prompts (one key: one partition, a fixed order)."""
    producer = bus.Producer(kafka.bootstrap_servers, client_id="test-lineage")
    for i in range(demos):
        key = keys[i % len(keys)]
        event = events_pb2.DemonstrationEvent(
            event_id=uuid.uuid4().hex, prompt=f"{uuid.uuid4().hex[:8]} say something",
            response="the river runs past the mill", user_id=key, split=TRAIN,
        )  # fmt: skip
        producer.send(topics.demonstrations, event, key=key)
    for i in range(prompts + val):
        served = events_pb2.ServedGeneration(
            event_id=uuid.uuid4().hex, prompt=f"{uuid.uuid4().hex[:8]} tell me",
            user_id="u", split=VAL if i >= prompts else TRAIN,
        )  # fmt: skip
        # One key, one partition: the val prompts keep their order across restarts.
        producer.send(topics.prompts, served, key="all")
    producer.close()


class Process:
    """One trainer process's objects, built as ``trainer.main.run`` builds them."""

    def __init__(self, cfg: TrainerConfig, topics: StreamTopics, kafka) -> None:
        resume = resume_offsets(cfg.registry)
        self.consumer = bus.Consumer(
            kafka.bootstrap_servers, topics.inputs(), group_id=cfg.group_id, client_id="test",
            start_offsets=StreamReader.start_offsets(topics, resume, True),
        )  # fmt: skip
        self.reader = StreamReader(self.consumer, TrainingData(cfg.data), topics, resume, cfg.data)
        self.producer = bus.Producer(kafka.bootstrap_servers, client_id="test-lineage")
        self.trainer = Trainer(
            cfg, reader=self.reader, producer=self.producer,
            metrics=TrainerMetrics(CollectorRegistry()), stream_topics=topics,
            corpus=PretrainCorpus(CORPUS), device="cpu",
        )  # fmt: skip
        self.trainer.resume_from(resume, set())

    def read(self, demos: int = 0, prompts: int = 0) -> None:
        data = self.reader.data
        for _ in range(200):
            self.reader.poll()
            if (
                len(data.pending_demonstrations) >= demos
                and len(data.prompts["train"]) >= prompts
                and self.reader.caught_up()
            ):
                return
        raise AssertionError("the records did not arrive")

    def round(self, kind: str) -> checkpoint.Manifest:
        result = self.trainer.run_round(kind)
        assert result.outcome == "published", result
        return checkpoint.read_manifest(self.trainer.registry / "policy" / str(result.version))

    def close(self) -> None:
        self.consumer.close()
        self.producer.close()
