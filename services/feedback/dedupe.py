"""Which feedback events are already stored, by event id.

Event ids are deterministic (``uuid5`` of kind and idempotency key), so a retried submission
has the id of the original. The gateway fills ``SeenEvents`` at start by reading
``rlhf.comparisons`` and ``rlhf.demonstrations`` from the beginning, keeps following them (so
replicas learn each other's events), and adds every event Kafka acks.

The rule every consumer of those topics applies (the trainer does): **keep the first record
of each ``event_id`` and drop any later one.** The gateway writes an event once except in rare
races (an ack lost although the broker stored the record, a gateway dying with records in
flight, two replicas taking the same key at the same instant); the rule makes those harmless.
"""

from __future__ import annotations

import threading

from rlhf import bus


class SeenEvents:
    """A thread-safe set of stored event ids."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def __contains__(self, event_id: object) -> bool:
        with self._lock:
            return event_id in self._ids

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    def add(self, event_id: str) -> None:
        with self._lock:
            self._ids.add(event_id)

    def add_record(self, record: bus.Record) -> None:
        self.add(record.value.event_id)  # type: ignore[attr-defined]
