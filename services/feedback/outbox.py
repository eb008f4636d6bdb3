"""Handing records from the gateway's event loop to kafka-python and the acks back.

kafka-python is thread-based: ``send`` may block (metadata refresh, a full buffer while the
broker is away) and acks arrive on the producer's I/O thread. ``Outbox`` keeps both off the
event loop: one sender thread calls ``send`` in submission order (so one prompt's records keep
their order), and acks come back as asyncio futures. Thread hops are batched: one wake-up of
the sender thread takes every queued record, and one ``call_soon_threadsafe`` settles every
ack that arrived meanwhile. At thousands of submissions per second a hop per record would cost
more than the work itself.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from google.protobuf.message import Message

from rlhf import bus, topics

_Item = tuple[topics.Topic, Message, str, asyncio.Future[None]]


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


class Outbox:
    def __init__(self, producer: bus.Producer, loop: asyncio.AbstractEventLoop) -> None:
        self._producer = producer
        self.loop = loop
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-send")
        self._lock = threading.Lock()
        self._queued: list[_Item] = []
        self._sending = False
        self._acked: list[tuple[asyncio.Future[None], BaseException | None]] = []
        self._settling = False

    def send(self, topic: topics.Topic, record: Message, key: str) -> asyncio.Future[None]:
        """Queues ``record``; the future resolves when Kafka acked it, or fails with the error."""
        acked: asyncio.Future[None] = self.loop.create_future()
        with self._lock:
            self._queued.append((topic, record, key, acked))
            wake = not self._sending
            self._sending = True
        if wake:
            self._thread.submit(self._send_queued)
        return acked

    def _send_queued(self) -> None:
        while True:
            with self._lock:
                items, self._queued = self._queued, []
                if not items:
                    self._sending = False
                    return
            for topic, record, key, acked in items:
                try:
                    pending = self._producer.send(topic, record, key=key)
                except Exception as exc:
                    self._done(acked, exc)
                    continue
                pending.add_callback(lambda _md, acked=acked: self._done(acked, None))
                pending.add_errback(lambda exc, acked=acked: self._done(acked, exc))

    def _done(self, acked: asyncio.Future[None], exc: BaseException | None) -> None:
        """Called on kafka-python's threads."""
        with self._lock:
            self._acked.append((acked, exc))
            if self._settling:
                return
            self._settling = True
        self.loop.call_soon_threadsafe(self._settle_acked)

    def _settle_acked(self) -> None:
        with self._lock:
            items, self._acked = self._acked, []
            self._settling = False
        for acked, exc in items:
            _settle(acked, exc)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
