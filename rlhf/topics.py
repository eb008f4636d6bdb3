"""The Kafka topics of the system: one protobuf record type per topic (``protos/rlhf/v1/events.proto``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from google.protobuf.message import Message

from rlhf.v1 import events_pb2


@dataclass(frozen=True)
class Topic:
    name: str
    record: type[Message]
    partitions: int
    # -1 keeps records forever; training data is the system's memory.
    retention_ms: int = -1
    compacted: bool = False

    def topic_configs(self) -> dict[str, str]:
        if self.compacted:
            return {"cleanup.policy": "compact", "min.insync.replicas": "1"}
        return {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}


# Served generations: high volume, 30 days is enough to learn from them.
PROMPTS = Topic(
    "rlhf.prompts", events_pb2.ServedGeneration, partitions=6, retention_ms=30 * 24 * 3600 * 1000
)
COMPARISONS = Topic("rlhf.comparisons", events_pb2.ComparisonEvent, partitions=3)
DEMONSTRATIONS = Topic("rlhf.demonstrations", events_pb2.DemonstrationEvent, partitions=3)
# The model lifecycle. Keys are event ids, so compaction drops nothing and a server that
# starts late replays the whole history to reach the same state as the others.
MODELS = Topic("rlhf.models", events_pb2.ModelEvent, partitions=1, compacted=True)

ALL = (PROMPTS, COMPARISONS, DEMONSTRATIONS, MODELS)


def dead_letter(topic_name: str) -> str:
    """Where records of ``topic_name`` go when they cannot be parsed."""
    return f"{topic_name}.dlq"


@dataclass(frozen=True)
class Topics:
    """The system's topics as one deployment names them: ``streams.topic_prefix`` (the same
    for every component, ``rlhf.streams``) before each name, so deployments can share a
    Kafka cluster. Dead-letter topics follow their topic's name."""

    prompts: Topic = PROMPTS
    comparisons: Topic = COMPARISONS
    demonstrations: Topic = DEMONSTRATIONS
    models: Topic = MODELS

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        if not prefix:
            return cls()
        return cls(*(dataclasses.replace(t, name=prefix + t.name) for t in cls().all()))

    def all(self) -> tuple[Topic, Topic, Topic, Topic]:
        return (self.prompts, self.comparisons, self.demonstrations, self.models)
