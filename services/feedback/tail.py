"""Reading a topic's whole history and then following it, on a supervised background thread.

The gateway keeps two in-memory views built this way: the served generations of
``rlhf.prompts`` (to resolve generation ids) and the event ids already in its own topics (to
answer retries as duplicates). Each view reads with a consumer group of its own that never
commits, so every replica and every restart reads from the beginning.

The thread is supervised (``rlhf.supervise``): if reading fails, it is restarted with a new
consumer that continues from the offsets already handled, and its health condition reports
the outage meanwhile. A tail also tracks when it last *confirmed* that it had read every
record that existed at that moment (``confirmed_after``): only then may the gateway say
that a generation id does not exist, rather than that it cannot tell yet.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from rlhf import bus, topics
from rlhf.supervise import Loop, Report, Supervised

log = logging.getLogger(__name__)

# While records flow, how often the tail asks for the log-end offsets to confirm it is current.
CONFIRM_INTERVAL_S = 1.0


class TopicTail:
    """Calls ``handle`` for every record of ``topics``, from the first one on, until stopped."""

    def __init__(
        self,
        bootstrap_servers: str,
        watched: Sequence[topics.Topic],
        handle: Callable[[bus.Record], None],
        *,
        client_id: str,
        registry: CollectorRegistry | None = None,
        follow: bool = True,
        check_crcs: bool = True,
        report: Report = lambda _ok, _detail: None,
    ) -> None:
        """``follow=False`` stops reading once caught up with the history. ``report(ok,
        detail)`` tells health whether the tail runs."""
        self._bootstrap = bootstrap_servers
        self._watched = list(watched)
        self._handle = handle
        self._client_id = client_id
        self._registry = registry
        self._follow = follow
        self._check_crcs = check_crcs
        self.name = "+".join(t.name for t in watched)
        self._lock = threading.Lock()
        self._positions: dict[tuple[str, int], int] = {}  # next offset to handle
        self._caught_up = threading.Event()
        self._confirmed_at = float("-inf")  # monotonic
        self._targets: dict[tuple[str, int], int] | None = None
        self._supervised = Supervised(
            f"tail-{self.name}", self._body, report=report, registry=registry,
            component="feedback",
        )  # fmt: skip

    def start(self) -> None:
        self._supervised.start()

    def stop(self) -> None:
        self._supervised.stop()

    def wait_caught_up(self, timeout_s: float) -> bool:
        """True once every record that existed when the tail started has been handled."""
        return self._caught_up.wait(timeout_s)

    def confirmed_after(self, moment: float) -> bool:
        """Whether the tail has handled every record that existed at some time after
        ``moment`` (``time.monotonic()``): a record not seen then did not exist at ``moment``."""
        with self._lock:
            return self._confirmed_at >= moment

    def _consumer(self) -> bus.Consumer:
        with self._lock:
            start = dict(self._positions)
        return bus.Consumer(
            self._bootstrap,
            self._watched,
            group_id=f"{self._client_id}-tail-{uuid.uuid4().hex}",
            client_id=self._client_id,
            registry=self._registry,
            auto_offset_reset="earliest",
            check_crcs=self._check_crcs,
            start_offsets=start,
        )

    def _confirm(self, consumer: bus.Consumer) -> None:
        """Asks for the log-end offsets; if everything below them was handled, the tail was
        current at the moment it asked. Unreachable brokers just leave it unconfirmed."""
        asked_at = time.monotonic()
        try:
            positions = consumer.positions()
            if not positions:
                return  # the group has not assigned partitions yet
            ends = consumer.end_offsets(timeout_s=2.0)
        except KafkaError as exc:
            log.debug("tail of %s cannot confirm it is current: %s", self.name, exc)
            return
        if self._targets is None:
            self._targets = ends
        if all(positions.get(tp, 0) >= end for tp, end in ends.items()):
            with self._lock:
                self._confirmed_at = asked_at
            self._caught_up.set()

    def _body(self, loop: Loop) -> None:
        consumer = self._consumer()
        last_confirm = 0.0
        try:
            while not loop.stopping:
                records = consumer.poll(timeout_s=0.2)
                for record in records:
                    self._handle(record)
                    with self._lock:
                        self._positions[(record.topic, record.partition)] = record.offset + 1
                loop.healthy()
                now = time.monotonic()
                if not records or now - last_confirm >= CONFIRM_INTERVAL_S:
                    last_confirm = now
                    self._confirm(consumer)
                    if self._caught_up.is_set() and not self._follow:
                        return
        finally:
            consumer.close()
