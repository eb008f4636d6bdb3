"""Publishes every served generation to Kafka (``rlhf.prompts``), off the request path.

``publish`` only appends to a bounded in-memory buffer and returns at once, so a slow or
down broker never slows or fails a response. A background thread sends the buffer in
batches and waits for Kafka's acks; records that were not acked stay at the head of the
buffer and are retried, with growing pauses while the broker is unreachable. A record is
dropped only when the buffer is full (the newest is refused) or at shutdown after
``close_timeout_s``; every drop is counted in ``rlhf_policy_publish_dropped_total{reason}``
and logged. A retried record may reach Kafka twice; consumers de-duplicate by ``event_id``.

Before a record is sent, PII in its prompt and sample texts is redacted with the feedback
gateway's redactor (``rlhf.pii``), counted in ``rlhf_policy_pii_redactions_total{kind}``:
these records are the trainer's PPO prompts. Redaction runs on the sender thread, off the
request path.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from rlhf import topics
from rlhf.bus import Producer
from rlhf.pii import RedactionMetrics, Redactor, redact_served
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)

# A full buffer can drop thousands of records a second: log the first and then a summary
# at most this often.
DROP_LOG_INTERVAL_S = 10.0


@dataclass
class _Pending:
    event: events_pb2.ServedGeneration
    redacted: bool = False


class GenerationPublisher:
    def __init__(
        self,
        producer: Producer,
        registry: CollectorRegistry,
        *,
        buffer_size: int = 10_000,
        batch_size: int = 256,
        ack_timeout_s: float = 15.0,
        max_backoff_s: float = 10.0,
        redactor: Redactor | None = None,
        topic: topics.Topic = topics.PROMPTS,
    ) -> None:
        """``redactor``: PII redaction before sending (None sends texts as served); ``topic``:
        where served generations go (``streams.topic_prefix`` names it)."""
        self._producer = producer
        self._topic = topic
        self._redactor = redactor
        self._pii = RedactionMetrics(registry, "policy")
        self._buffer_size = buffer_size
        self._batch_size = batch_size
        self._ack_timeout_s = ack_timeout_s
        self._max_backoff_s = max_backoff_s
        self._buffer: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._deadline: float | None = None
        # Drops not logged yet, by reason (a full buffer is logged at most every 10 s).
        self._log_lock = threading.Lock()
        self._unlogged: collections.Counter[str] = collections.Counter()
        self._last_drop_log = 0.0
        self.published = Counter(
            "rlhf_policy_published", "Served generations acked by Kafka", registry=registry
        )
        self.dropped = Counter(
            "rlhf_policy_publish_dropped",
            "Served generations never published (buffer full, or still unacked at shutdown)",
            ["reason"],
            registry=registry,
        )
        for reason in ("buffer_full", "shutdown", "closed"):
            self.dropped.labels(reason)  # exported as 0 from the start, so alerts see a series
        self.retries = Counter(
            "rlhf_policy_publish_retries",
            "Served generations sent again after a failed send",
            registry=registry,
        )
        self.buffered = Gauge(
            "rlhf_policy_publish_buffer_size",
            "Served generations waiting for Kafka",
            registry=registry,
        )
        self._thread = threading.Thread(target=self._run, name="prompts-publisher", daemon=True)
        self._thread.start()

    def publish(self, event: events_pb2.ServedGeneration) -> None:
        """Buffers ``event`` for sending; never blocks."""
        with self._cond:
            if self._closing:
                self._drop("closed", 1)
                return
            if len(self._buffer) >= self._buffer_size:
                self._drop("buffer_full", 1)
                return
            self._buffer.append(_Pending(event))
            self.buffered.set(len(self._buffer))
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._buffer)

    def close(self, timeout_s: float = 10.0) -> None:
        """Sends what it can within ``timeout_s``; counts and logs what remains as dropped."""
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout_s
            self._cond.notify()
        self._thread.join(timeout_s + self._ack_timeout_s + 5.0)
        with self._cond:
            left = len(self._buffer)
            self._buffer.clear()
            self.buffered.set(0)
        if left:
            self._drop("shutdown", left)
        with self._log_lock:
            self._log_drops(time.monotonic())  # what a full buffer dropped since the last log
        self._producer.close(timeout_s=max(1.0, timeout_s))

    def _drop(self, reason: str, count: int) -> None:
        self.dropped.labels(reason).inc(count)
        with self._log_lock:
            self._unlogged[reason] += count
            now = time.monotonic()
            if reason == "buffer_full" and now - self._last_drop_log < DROP_LOG_INTERVAL_S:
                return
            self._log_drops(now)

    def _log_drops(self, now: float) -> None:
        for why, n in self._unlogged.items():
            if n:
                log.error(
                    "dropped %d served generation(s) not published to %s (%s); "
                    "see rlhf_policy_publish_dropped_total",
                    n, self._topic.name, why,
                )  # fmt: skip
        self._unlogged.clear()
        self._last_drop_log = now

    def _take(self) -> list[_Pending] | None:
        """The next batch to send (left in the buffer until acked); None when it is time to stop."""
        with self._cond:
            while not self._buffer and not self._closing:
                self._cond.wait()
            if not self._buffer:
                return None
            if self._deadline is not None and time.monotonic() >= self._deadline:
                return None
            return [self._buffer[i] for i in range(min(self._batch_size, len(self._buffer)))]

    def _run(self) -> None:
        backoff = 0.0
        while (batch := self._take()) is not None:
            for pending in batch:
                self._redact(pending)
            acked = self._send([pending.event for pending in batch])
            with self._cond:
                for _ in range(acked):
                    self._buffer.popleft()
                self.buffered.set(len(self._buffer))
            self.published.inc(acked)
            if acked == len(batch):
                backoff = 0.0
                continue
            self.retries.inc(len(batch) - acked)
            backoff = min(self._max_backoff_s, max(0.2, backoff * 2))
            log.warning(
                "Kafka did not ack %d served generation(s); retrying in %.1fs (%d buffered)",
                len(batch) - acked,
                backoff,
                self.pending(),
            )
            with self._cond:
                # Wakes early on close so shutdown does not wait out the pause.
                self._cond.wait_for(lambda: self._closing, timeout=backoff)

    def _redact(self, pending: _Pending) -> None:
        if pending.redacted or self._redactor is None:
            return
        self._pii.count(redact_served(self._redactor, pending.event))
        pending.redacted = True

    def _send(self, batch: list[events_pb2.ServedGeneration]) -> int:
        """Sends ``batch`` and returns how many from its start were acked (order is kept)."""
        futures = []
        try:
            for event in batch:
                key = event.user_id or event.event_id
                futures.append(self._producer.send(self._topic, event, key=key))
        except Exception as exc:  # the sender thread must outlive any client error
            log.warning("sending to %s failed: %s", self._topic.name, exc)
        acked = 0
        for future in futures:
            try:
                future.get(timeout=self._ack_timeout_s)
            except Exception as exc:
                log.warning("%s: record not acked: %s", self._topic.name, exc)
                break
            acked += 1
        return acked
