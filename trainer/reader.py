"""Reads the three input topics into a ``TrainingData`` and commits what rounds published.

On start it seeks every partition to 0 when ``replay`` is on (records below ``resume`` are
history) or straight to ``resume`` otherwise.

Backpressure is per partition and never blocks history: when a kind's pending list is full,
the partitions of its topic that are past their resume offset are paused (a record read
beyond the bound is put back: the partition is rewound to it), while every other partition,
and any partition still re-reading history (which never becomes pending), keeps being read.
A round then trains on what is pending and frees room, so a backlog of any size drains in
rounds, and a kind whose rounds cannot run never stops the others.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rlhf import bus, topics
from rlhf.topics import Topic
from trainer.config import DataConfig
from trainer.data import KINDS, Offsets, Source, TrainingData
from trainer.metrics import TrainerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamTopics:
    """The topics the trainer reads and writes (``streams.topic_prefix``: ``rlhf.streams``)."""

    demonstrations: Topic = topics.DEMONSTRATIONS
    comparisons: Topic = topics.COMPARISONS
    prompts: Topic = topics.PROMPTS
    models: Topic = topics.MODELS

    @classmethod
    def of(cls, system: topics.Topics) -> StreamTopics:
        return cls(system.demonstrations, system.comparisons, system.prompts, system.models)

    @classmethod
    def with_prefix(cls, prefix: str) -> StreamTopics:
        return cls.of(topics.Topics.with_prefix(prefix))

    def inputs(self) -> tuple[Topic, Topic, Topic]:
        return (self.demonstrations, self.comparisons, self.prompts)

    def kind_of(self, topic_name: str) -> str:
        names = {t.name: kind for t, kind in zip(self.inputs(), KINDS, strict=True)}
        return names[topic_name]

    def of_kind(self, kind: str) -> Topic:
        return dict(zip(KINDS, self.inputs(), strict=True))[kind]

    def parked(self, kind: str) -> Topic:
        """Where labelled records that failed ``park_after_failures`` rounds are kept."""
        topic = self.of_kind(kind)
        return dataclasses.replace(topic, name=f"{topic.name}.parked", partitions=1)


class StreamReader:
    def __init__(
        self,
        consumer: bus.Consumer,
        data: TrainingData,
        stream_topics: StreamTopics,
        resume: Mapping[tuple[str, int], int],
        cfg: DataConfig,
        metrics: TrainerMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.consumer = consumer
        self.data = data
        self.topics = stream_topics
        self.resume: Offsets = dict(resume)
        self.cfg = cfg

    @staticmethod
    def start_offsets(
        stream_topics: StreamTopics, resume: Mapping[tuple[str, int], int], replay: bool
    ) -> Offsets:
        """What to pass to ``bus.Consumer(start_offsets=...)``."""
        if not replay:
            return dict(resume)
        # Offset 0 may have been deleted by retention; the consumer then resets to the earliest.
        return {(t.name, p): 0 for t in stream_topics.inputs() for p in range(t.partitions)}

    def poll(self) -> int:
        """Reads one batch into the buffers; returns how many records it took."""
        self._backpressure()
        records = self.consumer.poll(
            timeout_s=self.cfg.poll_timeout_s, max_records=self.cfg.poll_max_records
        )
        put_back: set[tuple[str, int]] = set()
        taken = 0
        for record in records:
            key = (record.topic, record.partition)
            if key in put_back:
                continue
            history = record.offset < self.resume.get(key, 0)
            kind = self.topics.kind_of(record.topic)
            if not history and self.data.full(kind):
                # Beyond the bound: read it again once a round made room.
                self.consumer.seek({key: record.offset}, on_assign=False)
                self.consumer.pause([key])
                put_back.add(key)
                continue
            source = Source(record.topic, record.partition, record.offset)
            outcome = self.data.add(kind, record.value, source, history=history)  # type: ignore[arg-type]
            taken += 1
            if self.metrics is not None:
                self.metrics.records.labels(topic=record.topic, outcome=outcome).inc()
            if outcome not in ("accepted", "duplicate"):
                log.debug("%s %s@%d rejected: %s", kind, record.topic, record.offset, outcome)
        return taken

    def _backpressure(self) -> None:
        """Pauses the new-data partitions of full kinds; resumes the others."""
        positions = self.consumer.positions()
        pause: list[tuple[str, int]] = []
        resume: list[tuple[str, int]] = []
        for key, position in positions.items():
            full = self.data.full(self.topics.kind_of(key[0]))
            (pause if full and position >= self.resume.get(key, 0) else resume).append(key)
        self.consumer.pause(pause)
        paused = self.consumer.paused()
        self.consumer.resume([k for k in resume if k in paused])

    def caught_up(self) -> bool:
        """History is re-read: every assigned partition's position reached its resume offset."""
        positions = self.consumer.positions()
        if not positions:
            return False
        return all(
            positions.get(key, 0) >= offset
            for key, offset in self.resume.items()
            if key in positions
        )

    def resume_offsets(self, trained: Iterable[str] = ()) -> Offsets:
        return self.data.resume_offsets(self.consumer.positions(), self.resume, trained)

    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        self.consumer.commit({k: v for k, v in offsets.items() if k in self.consumer.positions()})

    def lag(self) -> dict[str, int]:
        """Records in Kafka not read yet, per topic."""
        positions = self.consumer.positions()
        lag: Counter[str] = Counter()
        for (topic, partition), end in self.consumer.end_offsets().items():
            lag[topic] += max(0, end - positions.get((topic, partition), 0))
        return dict(lag)
