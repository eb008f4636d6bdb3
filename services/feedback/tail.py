"""Reading a topic's whole history and then following it, on a background thread.

The gateway keeps two in-memory views built this way: the served generations of
``rlhf.prompts`` (to resolve generation ids) and the event ids already in its own topics (to
answer retries as duplicates). Each view uses a consumer group of its own that never commits,
so every replica and every restart reads from the beginning.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry

from rlhf import bus, topics

log = logging.getLogger(__name__)


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
    ) -> None:
        """``follow=False`` stops reading once caught up with the history."""
        self._handle = handle
        self._follow = follow
        self.name = "+".join(t.name for t in watched)
        self._consumer = bus.Consumer(
            bootstrap_servers,
            watched,
            group_id=f"{client_id}-tail-{uuid.uuid4().hex}",
            client_id=client_id,
            registry=registry,
            auto_offset_reset="earliest",
            check_crcs=check_crcs,
        )
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._targets: dict[tuple[str, int], int] | None = None
        self._thread = threading.Thread(target=self._run, name=f"tail-{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait_caught_up(self, timeout_s: float) -> bool:
        """True once every record that existed when the tail started has been handled."""
        return self._caught_up.wait(timeout_s)

    def _check_caught_up(self) -> None:
        positions = self._consumer.positions()
        if not positions:
            return  # the group has not assigned partitions yet
        if self._targets is None:
            self._targets = self._consumer.end_offsets()
        if all(positions.get(tp, 0) >= end for tp, end in self._targets.items()):
            self._caught_up.set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for record in self._consumer.poll(timeout_s=0.2):
                    self._handle(record)
                if not self._caught_up.is_set():
                    self._check_caught_up()
                    if self._caught_up.is_set() and not self._follow:
                        return
        except Exception:
            # Kafka errors are retried inside kafka-python; anything reaching here is a bug,
            # and a silent dead tail would make the gateway forget duplicates.
            log.exception("tail of %s failed", self.name)
            raise
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
