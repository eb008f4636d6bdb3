"""What the trainer learns from: the three Kafka streams, filtered into bounded buffers.

Records arrive from ``rlhf.demonstrations``, ``rlhf.comparisons`` and ``rlhf.prompts``.
``TrainingData`` applies the paper's data rules to each one, in arrival order:

* **dedupe** by ``event_id`` (a redelivered or re-imported event counts once);
* **split**: train records feed rounds, validation records feed the gates, test records are
  only scored; an event without a split is rejected (its user's split is unknown, and a
  held-out user must never reach training);
* **per-user cap**: at most ``user_prompt_cap`` distinct prompts per user id, whatever the
  kind of record that carried them;
* **near-duplicates**: within one kind, a prompt whose first ``near_dup_prefix_chars``
  characters (case and whitespace folded) equal an earlier one's is dropped.

Exactly once into training: train demonstrations and comparisons wait in *pending* lists
until a round trains on them and its checkpoint is published (``mark_trained``); a failed
round leaves them pending. ``resume_offsets`` is, per partition, the offset of the oldest
pending record (or the read position when none is pending): everything before it is in a
published model or is evaluation data. The checkpoint manifest stores these offsets; a
restarted trainer re-reads each partition from the beginning up to them as *history* (which
rebuilds the dedupe and per-user state and the evaluation buffers but trains on nothing) and
from there on as new data. So every buffer's content is recoverable from Kafka offsets, and
nothing is trained twice or skipped. Per-user caps and near-duplicate decisions depend on
arrival order, which Kafka fixes within a partition (the gateway keys events by user).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rlhf import bus, topics
from rlhf.topics import Topic
from rlhf.v1 import events_pb2
from trainer.config import DataConfig
from trainer.metrics import TrainerMetrics

log = logging.getLogger(__name__)

Offsets = dict[tuple[str, int], int]
Event = events_pb2.DemonstrationEvent | events_pb2.ComparisonEvent | events_pb2.ServedGeneration
SPLITS = {
    events_pb2.SPLIT_TRAIN: "train",
    events_pb2.SPLIT_VALIDATION: "val",
    events_pb2.SPLIT_TEST: "test",
}
KINDS = ("demonstrations", "comparisons", "prompts")


@dataclass(frozen=True)
class Source:
    """Where a record was read: the Kafka coordinates that make buffers recoverable."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Demonstration:
    event_id: str
    prompt: str
    response: str
    user_id: str
    split: str
    source: Source


@dataclass(frozen=True)
class Comparison:
    """One K-way ranking: ``ranks[i]`` is the rank of ``responses[i]`` (1 is best, equal is a tie)."""

    event_id: str
    prompt: str
    responses: tuple[str, ...]
    ranks: tuple[int, ...]
    user_id: str
    labeler_id: str
    split: str
    source: Source


@dataclass(frozen=True)
class Prompt:
    event_id: str
    prompt: str
    user_id: str
    split: str
    source: Source


@dataclass(frozen=True)
class StreamTopics:
    """The topics the trainer reads and writes; a prefix lets deployments share one cluster."""

    demonstrations: Topic = topics.DEMONSTRATIONS
    comparisons: Topic = topics.COMPARISONS
    prompts: Topic = topics.PROMPTS
    models: Topic = topics.MODELS

    @classmethod
    def with_prefix(cls, prefix: str) -> StreamTopics:
        base = cls()
        if not prefix:
            return base
        return cls(
            *(dataclasses.replace(t, name=prefix + t.name) for t in (*base.inputs(), base.models))
        )

    def inputs(self) -> tuple[Topic, Topic, Topic]:
        return (self.demonstrations, self.comparisons, self.prompts)

    def kind_of(self, topic_name: str) -> str:
        names = {t.name: kind for t, kind in zip(self.inputs(), KINDS, strict=True)}
        return names[topic_name]


_SPACE = re.compile(r"\s+")


def near_dup_key(prompt: str, prefix_chars: int) -> str:
    """Prompts with equal keys are near-duplicates: same leading text, case and spacing folded."""
    folded = _SPACE.sub(" ", prompt.strip().lower())
    if prefix_chars:
        folded = folded[:prefix_chars]
    return hashlib.blake2b(folded.encode(), digest_size=12).hexdigest()


class TrainingData:
    """The data rules and the bounded buffers (no Kafka here: records come in via ``add``)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self._seen: set[str] = set()
        self._user_prompts: dict[str, set[str]] = {}
        self._prompt_keys: dict[str, set[str]] = {kind: set() for kind in KINDS}
        self.pending_demonstrations: list[Demonstration] = []
        self.pending_comparisons: list[Comparison] = []
        # Evaluation data and the PPO prompt pool keep the most recent records.
        self.demonstrations = {
            s: deque[Demonstration](maxlen=cfg.max_demonstrations) for s in ("train", "val", "test")
        }
        self.comparisons = {
            s: deque[Comparison](maxlen=cfg.max_comparisons) for s in ("val", "test")
        }
        self.prompts = {s: deque[Prompt](maxlen=cfg.max_prompts) for s in ("train", "val", "test")}
        self.new_prompts = 0

    # ------------------------------------------------------------------ intake

    def add(self, kind: str, value: Event, source: Source, *, history: bool = False) -> str:
        """Applies the data rules to one record; returns "accepted" or the rejection reason.

        A ``history`` record (re-read below the resume offsets) updates every state but is
        never pending: it is already in a published model or is evaluation data.
        """
        if value.event_id in self._seen:
            return "duplicate"
        split = SPLITS.get(value.split)
        if split is None:
            return "no_split"
        if not value.prompt.strip():
            return "invalid"
        if isinstance(value, events_pb2.ComparisonEvent) and not _valid_ranking(value):
            return "invalid"
        key = near_dup_key(value.prompt, self.cfg.near_dup_prefix_chars)
        # Rejected events are marked seen too: a redelivery is a duplicate, not a second rejection.
        self._seen.add(value.event_id)
        if self.cfg.near_dup_prefix_chars and key in self._prompt_keys[kind]:
            return "near_duplicate"
        user_prompts = self._user_prompts.setdefault(value.user_id, set())
        if key not in user_prompts and len(user_prompts) >= self.cfg.user_prompt_cap:
            return "user_cap"
        user_prompts.add(key)
        self._prompt_keys[kind].add(key)
        self._store(value, split, source, history)
        return "accepted"

    def _store(self, value: Event, split: str, source: Source, history: bool) -> None:
        new_train = split == "train" and not history
        if isinstance(value, events_pb2.DemonstrationEvent):
            demo = Demonstration(
                value.event_id, value.prompt, value.response, value.user_id, split, source
            )
            # Recent train demonstrations stay available to fit the RM's bias.
            self.demonstrations[split].append(demo)
            if new_train:
                self.pending_demonstrations.append(demo)
        elif isinstance(value, events_pb2.ComparisonEvent):
            cmp = Comparison(
                value.event_id,
                value.prompt,
                tuple(r.text for r in value.responses),
                tuple(int(r.rank) for r in value.responses),
                value.user_id,
                value.labeler_id,
                split,
                source,
            )
            if split != "train":
                self.comparisons[split].append(cmp)
            elif new_train:
                self.pending_comparisons.append(cmp)
        # Every prompt, whatever carried it, is a prompt PPO can roll out on.
        self.prompts[split].append(
            Prompt(value.event_id, value.prompt, value.user_id, split, source)
        )
        if new_train:
            self.new_prompts += 1

    # ------------------------------------------------------------------ rounds

    def full(self) -> bool:
        """Pending lists at their bound: stop reading until a round trains on them."""
        return (
            len(self.pending_demonstrations) >= self.cfg.max_demonstrations
            or len(self.pending_comparisons) >= self.cfg.max_comparisons
        )

    def mark_trained(self, kind: str, event_ids: Iterable[str]) -> None:
        """Records of a published round leave the pending lists (PPO resets the new-prompt count)."""
        ids = set(event_ids)
        if kind == "demonstrations":
            self.pending_demonstrations = [
                d for d in self.pending_demonstrations if d.event_id not in ids
            ]
        elif kind == "comparisons":
            self.pending_comparisons = [
                c for c in self.pending_comparisons if c.event_id not in ids
            ]
        elif kind == "prompts":
            self.new_prompts = 0
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def resume_offsets(
        self,
        positions: Mapping[tuple[str, int], int],
        floor: Mapping[tuple[str, int], int],
        trained: Iterable[str] = (),
    ) -> Offsets:
        """Per partition, where a restart must continue reading as new data.

        ``positions`` are the consumer's read positions; ``floor`` the offsets this run
        resumed from (a partition not read yet keeps its floor); ``trained`` event ids of
        pending records that the checkpoint about to be published contains.
        """
        done = set(trained)
        out: Offsets = dict(floor)
        for key, position in positions.items():
            out[key] = max(floor.get(key, 0), position)
        pending: list[Demonstration | Comparison] = [
            *self.pending_demonstrations,
            *self.pending_comparisons,
        ]
        for record in pending:
            if record.event_id in done:
                continue
            key = (record.source.topic, record.source.partition)
            out[key] = min(out.get(key, record.source.offset), record.source.offset)
        return out

    def counts(self) -> dict[tuple[str, str], int]:
        """(kind, split) -> buffered records, for the buffer gauges."""
        out = {("demonstrations", "train"): len(self.pending_demonstrations),
               ("comparisons", "train"): len(self.pending_comparisons)}  # fmt: skip
        for split in ("val", "test"):
            out[("demonstrations", split)] = len(self.demonstrations[split])
            out[("comparisons", split)] = len(self.comparisons[split])
        for split, pool in self.prompts.items():
            out[("prompts", split)] = len(pool)
        return out


def _valid_ranking(value: events_pb2.ComparisonEvent) -> bool:
    """2..9 responses, ranks >= 1, at least one strict preference (all-tie rankings teach nothing)."""
    ranks = [r.rank for r in value.responses]
    return 2 <= len(ranks) <= 9 and min(ranks) >= 1 and len(set(ranks)) > 1


class StreamReader:
    """Reads the three input topics into a ``TrainingData`` and commits what rounds published.

    On start it seeks every partition to 0 when ``replay`` is on (records below ``resume``
    are history) or straight to ``resume`` otherwise.
    """

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
        """Reads one batch into the buffers; returns how many records it read."""
        if self.data.full():
            return 0
        records = self.consumer.poll(
            timeout_s=self.cfg.poll_timeout_s, max_records=self.cfg.poll_max_records
        )
        for record in records:
            source = Source(record.topic, record.partition, record.offset)
            history = record.offset < self.resume.get((record.topic, record.partition), 0)
            kind = self.topics.kind_of(record.topic)
            outcome = self.data.add(kind, record.value, source, history=history)  # type: ignore[arg-type]
            if self.metrics is not None:
                self.metrics.records.labels(topic=record.topic, outcome=outcome).inc()
            if outcome not in ("accepted", "duplicate"):
                log.debug("%s %s@%d rejected: %s", kind, record.topic, record.offset, outcome)
        return len(records)

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
