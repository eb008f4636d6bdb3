"""Resolving generation ids: comparisons refer to responses by the ids the policy server
returned, and the gateway turns each id into (prompt, text, model version, token ids,
logprobs) so the trainer knows which policy produced every response.

The policy server publishes every served generation to ``rlhf.prompts``; the gateway reads
that topic from the beginning (``tail.TopicTail``) into a ``GenerationIndex``: bounded in size
(least recently used entries go first) and in age (older than the TTL is expired).
A comparison may arrive before its generation was read (the publisher and the labeler race),
so ``resolve`` waits a bounded time for missing ids, woken by the feed. An id still missing
is NOT_FOUND only when the feed confirms it has read everything that existed after the
request arrived (it is known to be absent); while the feed cannot confirm that (Kafka
unreachable, the tail restarting), the answer is a retryable UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc

from rlhf import bus
from rlhf.v1 import events_pb2
from services.feedback.validate import Rejection


@dataclass(frozen=True)
class ServedSample:
    generation_id: str
    prompt: str
    messages: tuple[tuple[str, str], ...]  # (role, content) of a chat request; () for a prompt
    text: str
    model_version: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    created_at_ms: int


class GenerationIndex:
    """Thread-safe LRU/TTL map from generation id to the served sample.

    ``add`` is called from the feed's thread; ``resolve`` from the gateway's event loop.
    """

    def __init__(
        self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._max_entries = max_entries
        self._ttl_ms = int(ttl_s * 1000)
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, ServedSample] = OrderedDict()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _expired(self, sample: ServedSample) -> bool:
        return sample.created_at_ms < self._clock() * 1000 - self._ttl_ms

    def add_record(self, record: bus.Record) -> None:
        assert isinstance(record.value, events_pb2.ServedGeneration)
        self.add(record.value, record.timestamp_ms)

    def add(self, generation: events_pb2.ServedGeneration, timestamp_ms: int = 0) -> None:
        created = generation.created_at_ms or timestamp_ms
        woken: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        with self._lock:
            for s in generation.samples:
                sample = ServedSample(
                    generation_id=s.generation_id,
                    prompt=generation.prompt,
                    messages=tuple((m.role, m.content) for m in generation.messages),
                    text=s.text,
                    model_version=generation.model_version,
                    token_ids=tuple(s.token_ids),
                    logprobs=tuple(s.logprobs),
                    created_at_ms=created,
                )
                if self._expired(sample):
                    continue
                self._entries[s.generation_id] = sample
                self._entries.move_to_end(s.generation_id)
                woken.extend(self._waiters.pop(s.generation_id, ()))
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        for loop, future in woken:
            loop.call_soon_threadsafe(_set_done, future)

    def get(self, generation_id: str) -> ServedSample | None:
        """The sample, or None when the id is unknown or expired."""
        with self._lock:
            sample = self._entries.get(generation_id)
            if sample is None:
                return None
            if self._expired(sample):
                del self._entries[generation_id]
                return None
            self._entries.move_to_end(generation_id)
            return sample

    async def resolve(
        self,
        generation_ids: Mapping[int, str],
        wait_s: float,
        confirmed_after: Callable[[float], bool] = lambda _moment: True,
    ) -> dict[int, ServedSample]:
        """Looks up the id of each response index, waiting up to ``wait_s`` for ids not read yet.

        Raises ``Rejection(NOT_FOUND)`` naming the first id that stays unknown or is expired,
        once ``confirmed_after(arrival)`` says the feed has read everything that existed
        after the request arrived; ``Rejection(UNAVAILABLE)`` when it cannot say so in time.
        """
        arrived = time.monotonic()
        loop = asyncio.get_running_loop()
        pending: dict[str, asyncio.Future[None]] = {}
        with self._lock:
            for gid in generation_ids.values():
                if gid not in self._entries and gid not in pending:
                    future: asyncio.Future[None] = loop.create_future()
                    self._waiters.setdefault(gid, []).append((loop, future))
                    pending[gid] = future
        if pending and wait_s > 0:
            await asyncio.wait(pending.values(), timeout=wait_s)
        if pending:
            with self._lock:
                for gid, future in pending.items():
                    waiters = self._waiters.get(gid, [])
                    waiters[:] = [w for w in waiters if w[1] is not future]
                    if not waiters:
                        self._waiters.pop(gid, None)
        found = {}
        for i, gid in generation_ids.items():
            sample = self.get(gid)
            if sample is None:
                if not await _wait_confirmed(confirmed_after, arrived, max(wait_s, 1.0)):
                    raise Rejection(
                        grpc.StatusCode.UNAVAILABLE,
                        "unavailable",
                        f"responses[{i}].generation_id: {gid!r} is not in the index of served "
                        "generations, which cannot confirm it is current (Kafka unreachable?); "
                        "retry with the same idempotency key",
                    )
                late = self.get(gid)  # read while confirming
                if late is not None:
                    found[i] = late
                    continue
                raise Rejection(
                    grpc.StatusCode.NOT_FOUND,
                    "unknown_generation",
                    f"responses[{i}].generation_id: {gid!r} is unknown or expired; refer to a "
                    "generation served recently or give the response as text",
                )
            found[i] = sample
        return found


async def _wait_confirmed(
    confirmed_after: Callable[[float], bool], moment: float, timeout_s: float
) -> bool:
    # Polled: the feed confirms from its own thread about every 0.2 s while it is current.
    deadline = time.monotonic() + timeout_s
    while not confirmed_after(moment):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
