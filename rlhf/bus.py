"""The event bus: typed Kafka producer and consumer over kafka-python.

Record values are the protobuf messages of ``rlhf.v1.events`` (one type per topic, see
``rlhf.topics``); keys are UTF-8 strings. The producer is idempotent with ``acks=all``: a
send that was acked is on the broker exactly once. Consumers never auto-commit; the caller
commits once what it read is safely used (the trainer: after a checkpoint is published).
A record that does not parse as its topic's type, or has no ``event_id``, goes to the
topic's dead-letter topic (``<topic>.dlq``) with the reason in its headers, and consumption
goes on.

Every client reconnects within a second of a broker coming back (kafka-python's own default
backs off up to 30 s), and a producer whose records expired is replaced by a new one (see
``Producer``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from google.protobuf.message import DecodeError, Message
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata, RecordMetadata
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter

from rlhf.topics import ALL, Topic, dead_letter

log = logging.getLogger(__name__)

# (topic name, partition) -> offset of the next record to read.
Offsets = Mapping[tuple[str, int], int]

# Reconnect promptly when a broker comes back; kafka-python's defaults back off up to 30 s,
# which kept components idle long after an outage ended.
RECONNECT = {"reconnect_backoff_ms": 50, "reconnect_backoff_max_ms": 1000}


def security_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Kafka client security settings from the environment (the Helm chart sets these from a
    Secret): ``RLHF_KAFKA_SECURITY_PROTOCOL`` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL),
    ``RLHF_KAFKA_SASL_MECHANISM`` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512),
    ``RLHF_KAFKA_SASL_USERNAME`` and ``RLHF_KAFKA_SASL_PASSWORD``. Credentials stay out of
    config files and flags, which end up in logs and process listings."""
    env = os.environ if env is None else env
    out: dict[str, Any] = {}
    protocol = env.get("RLHF_KAFKA_SECURITY_PROTOCOL", "")
    if protocol:
        out["security_protocol"] = protocol
    if protocol.startswith("SASL"):
        out["sasl_mechanism"] = env.get("RLHF_KAFKA_SASL_MECHANISM", "PLAIN")
        out["sasl_plain_username"] = env.get("RLHF_KAFKA_SASL_USERNAME", "")
        out["sasl_plain_password"] = env.get("RLHF_KAFKA_SASL_PASSWORD", "")
    return out


class PublishError(RuntimeError):
    """A record was not acknowledged by Kafka in time; it may be retried."""


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: Message
    timestamp_ms: int


class _BusMetrics:
    """The bus's counters in one registry, shared by every producer and consumer using it."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, _BusMetrics]] = (
        weakref.WeakKeyDictionary()
    )
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def of(cls, registry: CollectorRegistry | None) -> _BusMetrics:
        if registry is None:
            return cls(CollectorRegistry())
        with cls._lock:
            if registry not in cls._by_registry:
                cls._by_registry[registry] = cls(registry)
            return cls._by_registry[registry]

    def __init__(self, registry: CollectorRegistry) -> None:
        self.produced = Counter(
            "rlhf_bus_records_produced_total",
            "Records acked by Kafka",
            ["topic"],
            registry=registry,
        )
        self.produce_errors = Counter(
            "rlhf_bus_produce_errors_total",
            "Records Kafka did not ack",
            ["topic"],
            registry=registry,
        )
        self.consumed = Counter(
            "rlhf_bus_records_consumed_total",
            "Records read and parsed",
            ["topic"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "rlhf_bus_dead_letters_total",
            "Unparseable records sent to the dead-letter topic",
            ["topic"],
            registry=registry,
        )
        self.producer_renewals = Counter(
            "rlhf_bus_producer_renewals_total",
            "Producers replaced by a new one after records expired undelivered",
            registry=registry,
        )


Delivery = Callable[[BaseException | None], None]


class Producer:
    """Idempotent, ``acks=all`` producer of protobuf records.

    The constructor does not need the broker to be up: connection and retries happen in the
    background. ``send`` blocks for at most ``max_block_ms`` (5 s) when the topic's metadata is
    not known yet, and its future fails once ``delivery_timeout_ms`` passed without an ack.

    When records expire (the delivery timeout passed, typically a broker outage longer than
    it), the underlying kafka-python producer is replaced by a new one. kafka-python drops
    its idempotent producer id when a batch it had already sent expires and never asks for a
    new one, so without this every later send would time out until a restart. The new
    producer gets a new id; a record both producers wrote is a duplicate, which consumers
    drop by ``event_id``.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        client_id: str,
        registry: CollectorRegistry | None = None,
        **overrides: Any,
    ) -> None:
        config: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers.split(","),
            "client_id": client_id,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 2,
            "request_timeout_ms": 10_000,
            "delivery_timeout_ms": 30_000,
            "max_block_ms": 5_000,
            # Skips the blocking version probe at start-up so a producer can be built while
            # Kafka is down (the servers must start and serve without it).
            "api_version": (4, 0),
            **RECONNECT,
            **security_from_env(),
        }
        config.update(overrides)
        self._config = config
        self._lock = threading.Lock()
        self._producer = KafkaProducer(**config)
        self._generation = 0
        self._closed = False
        self._listeners: list[Delivery] = []
        self._metrics = _BusMetrics.of(registry)

    def on_delivery(self, listener: Delivery) -> None:
        """Calls ``listener(None)`` for every acked record and ``listener(error)`` for every
        record Kafka did not take, on kafka-python's threads (keep it short)."""
        self._listeners.append(listener)

    def _current(self) -> tuple[KafkaProducer, int]:
        with self._lock:
            return self._producer, self._generation

    def _watch(self, future: FutureRecordMetadata, topic_name: str, generation: int) -> None:
        def acked(_metadata: Any) -> None:
            self._metrics.produced.labels(topic_name).inc()
            for listener in self._listeners:
                listener(None)

        def failed(exc: BaseException) -> None:
            self._metrics.produce_errors.labels(topic_name).inc()
            for listener in self._listeners:
                listener(exc)
            if isinstance(exc, KafkaTimeoutError):
                self._renew(generation, exc)

        future.add_callback(acked)
        future.add_errback(failed)

    def _renew(self, generation: int, cause: BaseException) -> None:
        """Replaces the kafka-python producer that ``generation`` names, once."""
        with self._lock:
            if self._closed or generation != self._generation:
                return
            old = self._producer
            self._producer = KafkaProducer(**self._config)
            self._generation += 1
        self._metrics.producer_renewals.inc()
        log.warning(
            "Kafka producer %s: records expired undelivered (%s); continuing with a new producer",
            self._config["client_id"], cause,
        )  # fmt: skip
        # Not on this thread: this may be the old producer's own I/O thread.
        threading.Thread(target=_discard, args=(old,), name="producer-close", daemon=True).start()

    def send(self, topic: Topic, record: Message, *, key: str) -> FutureRecordMetadata:
        """Queues ``record``; the returned future resolves once Kafka acked it."""
        if not isinstance(record, topic.record):
            raise TypeError(
                f"{topic.name} takes {topic.record.__name__}, not {type(record).__name__}"
            )
        producer, generation = self._current()
        future = producer.send(topic.name, value=record.SerializeToString(), key=key.encode())
        self._watch(future, topic.name, generation)
        return future

    def send_sync(
        self, topic: Topic, record: Message, *, key: str, timeout_s: float = 10.0
    ) -> RecordMetadata:
        """Sends and waits for the ack; raises PublishError when Kafka did not ack in time."""
        try:
            return self.send(topic, record, key=key).get(timeout=timeout_s)
        except KafkaError as exc:
            raise PublishError(f"{topic.name}: not acked: {exc}") from exc

    def send_raw(
        self,
        topic_name: str,
        value: bytes | None,
        *,
        key: bytes | None,
        headers: list | None = None,
    ) -> FutureRecordMetadata:
        """Sends bytes as they are (dead letters, tests of malformed input)."""
        producer, generation = self._current()
        future = producer.send(topic_name, value=value, key=key, headers=headers or [])
        self._watch(future, topic_name, generation)
        return future

    def flush(self, timeout_s: float | None = None) -> None:
        self._current()[0].flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            producer = self._producer
        producer.close(timeout=timeout_s)


def _discard(producer: KafkaProducer) -> None:
    """Closes ``producer`` at once, failing every record it still holds, so that whoever
    waits on one hears of it now (and may retry through the new producer) instead of after
    the delivery timeout. ``KafkaProducer.close(timeout=0)`` flushes first and raises while
    records are pending, never reaching its own force close; its sender is force-closed
    directly then."""
    try:
        producer.close(timeout=0)
        return
    except KafkaError:
        pass
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()  # aborts the incomplete batches, failing their futures
        sender.join(10)
    with contextlib.suppress(KafkaError):
        producer.close(timeout=0)


class BrokerProbe:
    """Whether the brokers leading ``topics``' partitions answer now: asks them for their end
    offsets, which reaches the same brokers a produce goes to, and writes nothing."""

    def __init__(
        self, bootstrap_servers: str, watched: Sequence[Topic], *, client_id: str, timeout_s: float
    ) -> None:
        self._names = [t.name for t in watched]
        self._timeout_ms = int(timeout_s * 1000)
        self._lock = threading.Lock()
        self._kafka = KafkaConsumer(
            bootstrap_servers=bootstrap_servers.split(","),
            client_id=client_id,
            group_id=None,
            enable_auto_commit=False,
            api_version=(4, 0),
            request_timeout_ms=max(self._timeout_ms, 1000),
            **RECONNECT,
            **security_from_env(),
        )

    def check(self) -> str | None:
        """None when every partition leader answered; otherwise what failed."""
        with self._lock:
            try:
                partitions = []
                for name in self._names:
                    ids = self._kafka.partitions_for_topic(name)
                    if not ids:
                        return f"no partition metadata for {name}"
                    partitions += [TopicPartition(name, p) for p in ids]
                self._kafka.end_offsets(partitions, timeout_ms=self._timeout_ms)
            except KafkaError as exc:
                return f"{type(exc).__name__}: {exc}"
        return None

    def close(self) -> None:
        with self._lock:
            self._kafka.close()


class _SeekOnAssign(ConsumerRebalanceListener):
    """Applies start offsets when partitions are assigned (they can only be sought then)."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    def on_partitions_assigned(self, assigned: Any) -> None:
        for tp in assigned:
            offset = self._consumer._start_offsets.get((tp.topic, tp.partition))
            if offset is not None:
                self._consumer._kafka.seek(tp, offset)


class Consumer:
    """A consumer-group member reading protobuf records of the given topics, committing by hand.

    ``start_offsets`` (e.g. the offsets in the latest checkpoint manifest) override the
    group's committed offsets for those partitions.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Sequence[Topic],
        *,
        group_id: str,
        client_id: str,
        registry: CollectorRegistry | None = None,
        auto_offset_reset: str = "earliest",
        dead_letter: Producer | None = None,
        start_offsets: Offsets | None = None,
        **overrides: Any,
    ) -> None:
        self._topics = {t.name: t for t in topics}
        self._dead_letter = dead_letter
        self._metrics = _BusMetrics.of(registry)
        self._start_offsets = dict(start_offsets or {})
        self._lock = threading.Lock()
        config: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers.split(","),
            "client_id": client_id,
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": auto_offset_reset,
            "api_version": (4, 0),
            **RECONNECT,
            **security_from_env(),
        }
        config.update(overrides)
        self._kafka = KafkaConsumer(**config)
        self._kafka.subscribe(list(self._topics), listener=_SeekOnAssign(self))

    def poll(self, timeout_s: float = 1.0, max_records: int = 500) -> list[Record]:
        """Returns the next parsed records (possibly none); bad ones go to the dead-letter topic."""
        with self._lock:
            batches = self._kafka.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out: list[Record] = []
        for tp, messages in batches.items():
            topic = self._topics[tp.topic]
            for m in messages:
                if m.value is None:
                    continue  # a compaction tombstone: nothing to read
                try:
                    value = topic.record.FromString(m.value)
                    if not getattr(value, "event_id", ""):
                        raise DecodeError("record has no event_id")
                except DecodeError as exc:
                    self._to_dead_letter(m, str(exc))
                    continue
                key = m.key.decode(errors="replace") if m.key is not None else None
                out.append(Record(m.topic, m.partition, m.offset, key, value, m.timestamp))
                self._metrics.consumed.labels(m.topic).inc()
        return out

    def _to_dead_letter(self, m: Any, reason: str) -> None:
        log.warning("%s[%d]@%d does not parse (%s); sent to %s",
                    m.topic, m.partition, m.offset, reason, dead_letter(m.topic))  # fmt: skip
        self._metrics.dead_letters.labels(m.topic).inc()
        if self._dead_letter is None:
            return
        headers = [
            ("rlhf.source", f"{m.topic}[{m.partition}]@{m.offset}".encode()),
            ("rlhf.error", reason.encode()),
        ]
        # Waiting for the ack keeps "consumed past it" from ever meaning "lost it".
        self._dead_letter.send_raw(dead_letter(m.topic), m.value, key=m.key, headers=headers).get(
            timeout=30
        )

    def positions(self) -> dict[tuple[str, int], int]:
        """The next offset to read for every assigned partition."""
        with self._lock:
            return {
                (tp.topic, tp.partition): self._kafka.position(tp)
                for tp in self._kafka.assignment()
            }

    def commit(self, offsets: Offsets | None = None) -> None:
        """Commits ``offsets`` (next offset to read per partition), or the current positions."""
        chosen = dict(offsets) if offsets is not None else self.positions()
        payload = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
            for (topic, partition), offset in chosen.items()
        }
        with self._lock:
            self._kafka.commit(payload)

    def committed(self) -> dict[tuple[str, int], int]:
        """The group's committed offsets for the assigned partitions (absent: none committed)."""
        out = {}
        with self._lock:
            for tp in self._kafka.assignment():
                offset = self._kafka.committed(tp)
                if offset is not None:
                    out[(tp.topic, tp.partition)] = offset
        return out

    def end_offsets(self, timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
        """Log-end offsets of the assigned partitions (for consumer lag); raises a KafkaError
        (KafkaTimeoutError) when the brokers do not answer within ``timeout_s``."""
        with self._lock:
            ends = self._kafka.end_offsets(
                list(self._kafka.assignment()), timeout_ms=int(timeout_s * 1000)
            )
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}

    def seek(self, offsets: Offsets, *, on_assign: bool = True) -> None:
        """Moves to the given offsets now for assigned partitions, and (``on_assign``) on
        later assignment."""
        if on_assign:
            self._start_offsets.update(offsets)
        with self._lock:
            assigned = {(tp.topic, tp.partition): tp for tp in self._kafka.assignment()}
            for key, offset in offsets.items():
                if key in assigned:
                    self._kafka.seek(assigned[key], offset)

    def pause(self, keys: Iterable[tuple[str, int]]) -> None:
        """Stops fetching from these assigned partitions until ``resume`` (backpressure)."""
        self._set_paused(keys, True)

    def resume(self, keys: Iterable[tuple[str, int]]) -> None:
        self._set_paused(keys, False)

    def paused(self) -> set[tuple[str, int]]:
        with self._lock:
            return {(tp.topic, tp.partition) for tp in self._kafka.paused()}

    def _set_paused(self, keys: Iterable[tuple[str, int]], paused: bool) -> None:
        wanted = set(keys)
        with self._lock:
            tps = [tp for tp in self._kafka.assignment() if (tp.topic, tp.partition) in wanted]
            if not tps:
                return
            if paused:
                self._kafka.pause(*tps)
                return
            self._kafka.resume(*tps)
            # kafka-python 3.0 parks the records it had buffered for a paused partition and
            # hands them back only once its in-line slot is empty (None), which a drained slot
            # never is: the resumed partition would never be fetched again. The position is
            # authoritative, so dropping what it parked costs only a re-fetch.
            parked = getattr(
                getattr(self._kafka, "_fetcher", None), "_paused_partition_records", {}
            )
            for tp in tps:
                records = parked.pop(tp, None)
                if records is not None:
                    records.drain()

    def close(self) -> None:
        with self._lock:
            self._kafka.close(autocommit=False)


class KafkaUnavailable(RuntimeError):
    """No broker of the cluster answered."""


def _admin(bootstrap_servers: str, timeout_s: float) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(
            bootstrap_servers=bootstrap_servers.split(","),
            client_id="rlhf-admin",
            request_timeout_ms=int(timeout_s * 1000),
            **RECONNECT,
            **security_from_env(),
        )
    except KafkaTimeoutError as exc:  # "Unable to bootstrap"
        raise KafkaUnavailable(f"cannot reach Kafka at {bootstrap_servers}") from exc


def missing_topics(
    bootstrap_servers: str, wanted: Sequence[Topic], timeout_s: float = 30.0
) -> list[str]:
    """Names of ``wanted`` topics the cluster does not have; raises KafkaUnavailable."""
    admin = _admin(bootstrap_servers, timeout_s)
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    return [t.name for t in wanted if t.name not in existing]


def ensure_topics(
    bootstrap_servers: str,
    topics: Sequence[Topic] = ALL,
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Creates the topics (and their dead-letter topics) that do not exist yet; returns the
    names it created. Raises KafkaUnavailable when no broker answers."""
    admin = _admin(bootstrap_servers, timeout_s)
    try:
        existing = set(admin.list_topics())
        wanted = []
        for t in topics:
            if t.name not in existing:
                wanted.append(
                    NewTopic(
                        t.name, t.partitions, replication_factor, topic_configs=t.topic_configs()
                    )
                )
            if dead_letter(t.name) not in existing:
                wanted.append(NewTopic(dead_letter(t.name), 1, replication_factor))
        if wanted:
            # Another process may create them concurrently; either way they exist after this.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(wanted, timeout_ms=int(timeout_s * 1000))
        return [t.name for t in wanted]
    finally:
        admin.close()
