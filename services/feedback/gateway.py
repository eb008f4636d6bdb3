"""The feedback pipeline shared by the gRPC servicer and the importer: validate, resolve
generation ids, apply the data policy (PII redaction, split), then store exactly once.

Exactly once, end to end:

* An event's id is ``uuid5(kind + idempotency key)``, so a retry has the same id as the
  original, on any replica and after any restart.
* The gateway answers OK only after Kafka acknowledged the record (idempotent producer,
  ``acks=all``); otherwise the client gets UNAVAILABLE and may retry with the same key.
* Before writing, the gateway looks the id up in ``SeenEvents``, rebuilt at start from its
  own topics and kept current by tailing them; a hit answers ``duplicate=true`` and writes
  nothing. A retry that arrives while the first attempt is still unacknowledged waits for
  that attempt instead of writing a second copy.
* A few cases can still leave two records with one id: an attempt the producer gave up on
  although the broker had stored it (the ack lost on the way back), a gateway that died
  with records in flight, two replicas taking the same key at the same instant. Consumers
  therefore keep the first record of each ``event_id`` and drop later ones; with that rule
  every accepted submission is used exactly once.

Records are keyed by a hash of the (redacted) prompt or conversation, so all events of one
prompt land in one partition, in order. A conversation (``messages``) takes the place of the
prompt everywhere: validated by the rules its encoding uses, redacted turn by turn, and
matched against the conversation a generation id was served for.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as MetricCounter

from rlhf import bus, topics
from rlhf.chat import prompt_of, prompt_text
from rlhf.pii import RedactionMetrics, Redactor
from rlhf.v1 import events_pb2, feedback_pb2, inference_pb2
from services.feedback.config import GatewayConfig
from services.feedback.dedupe import SeenEvents
from services.feedback.generations import GenerationIndex
from services.feedback.outbox import Outbox
from services.feedback.store_health import StoreHealth
from services.feedback.tail import TopicTail
from services.feedback.validate import (
    Rejection,
    check_distinct,
    check_text,
    validate_comparison,
    validate_demonstration,
)

log = logging.getLogger(__name__)

COMPARISON = "comparison"
DEMONSTRATION = "demonstration"
# Fixed forever: changing it would give retried submissions new ids.
_EVENT_NAMESPACE = uuid.UUID("6f1d3c52-8c1e-4f4e-9a57-2f0e7b1c9d11")


def event_id_for(kind: str, idempotency_key: str) -> str:
    """The deterministic event id of a submission: the same key always maps to the same id."""
    return uuid.uuid5(_EVENT_NAMESPACE, f"{kind}:{idempotency_key}").hex


def _turns(messages: Sequence[inference_pb2.ChatMessage]) -> tuple[tuple[str, str], ...]:
    return tuple((m.role, m.content) for m in messages)


def _key_text(prompt: str, messages: Sequence[inference_pb2.ChatMessage]) -> str:
    return prompt_text(prompt_of(prompt, messages))


def record_key(prompt: str) -> str:
    """Kafka record key: one prompt's events share a partition and stay ordered."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class Submitted:
    event_id: str
    duplicate: bool
    # The stored record; None for a duplicate (the original was stored earlier).
    event: events_pb2.ComparisonEvent | events_pb2.DemonstrationEvent | None


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.accepted = MetricCounter(
            "rlhf_feedback_events_accepted_total",
            "Feedback events stored in Kafka (acknowledged)",
            ["type"],
            registry=registry,
        )
        self.rejected = MetricCounter(
            "rlhf_feedback_events_rejected_total",
            "Feedback submissions not stored, by reason",
            ["type", "reason"],
            registry=registry,
        )
        self.ack_seconds = Histogram(
            "rlhf_feedback_kafka_ack_seconds",
            "Time from handing a record to the producer until Kafka acknowledged it",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.dedupe_hits = MetricCounter(
            "rlhf_feedback_dedupe_hits_total",
            "Submissions answered as duplicates of an already stored event",
            registry=registry,
        )
        self.pii = RedactionMetrics(registry, "feedback")


class FeedbackGateway:
    """Validates, enriches and stores feedback; one instance per process, on one event loop."""

    def __init__(
        self,
        config: GatewayConfig,
        producer: bus.Producer,
        generations: GenerationIndex,
        seen: SeenEvents,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.time,
        store_health: StoreHealth | None = None,
        ready: Callable[[], bool] = lambda: True,
        confirmed_after: Callable[[float], bool] = lambda _moment: True,
    ) -> None:
        """``ready()``: the index of stored events is built (submissions wait for it);
        ``confirmed_after``: the served-generations feed's (``TopicTail.confirmed_after``)."""
        self._config = config
        self._store_health = store_health
        self._ready = ready
        self._confirmed_after = confirmed_after
        self._producer = producer
        self._generations = generations
        self._seen = seen
        self._clock = clock
        self._redactor = Redactor(config.policy.pii_kinds)
        self.metrics = GatewayMetrics(registry)
        # Created on first use: the gateway is built off the loop it will serve on.
        self._outbox: Outbox | None = None
        # Attempts not settled yet, by event id; the value becomes True once Kafka acked.
        self._inflight: dict[str, asyncio.Future[bool]] = {}

    def close(self) -> None:
        if self._outbox is not None:
            self._outbox.close()

    async def submit(self, item: feedback_pb2.FeedbackItem) -> Submitted:
        which = item.WhichOneof("item")
        if which == "comparison":
            return await self.submit_comparison(item.comparison)
        if which == "demonstration":
            return await self.submit_demonstration(item.demonstration)
        self.metrics.rejected.labels("unknown", "missing_field").inc()
        raise Rejection(
            grpc.StatusCode.INVALID_ARGUMENT,
            "missing_field",
            "item: set comparison or demonstration",
        )

    async def submit_comparison(self, request: feedback_pb2.ComparisonRequest) -> Submitted:
        return await self._submit(
            COMPARISON,
            request.idempotency_key,
            functools.partial(validate_comparison, request, self._config.limits),
            functools.partial(self._comparison_event, request),
        )

    async def submit_demonstration(self, request: feedback_pb2.DemonstrationRequest) -> Submitted:
        return await self._submit(
            DEMONSTRATION,
            request.idempotency_key,
            functools.partial(validate_demonstration, request, self._config.limits),
            functools.partial(self._demonstration_event, request),
        )

    def _redact(self, text: str, counts: Counter[str]) -> tuple[str, bool]:
        redacted, found = self._redactor.redact(text)
        counts.update(found)
        return redacted, bool(found)

    def _redact_messages(
        self, messages: Sequence[inference_pb2.ChatMessage], counts: Counter[str]
    ) -> list[inference_pb2.ChatMessage]:
        return [
            inference_pb2.ChatMessage(role=m.role, content=self._redact(m.content, counts)[0])
            for m in messages
        ]

    def _split(self, user_id: str) -> events_pb2.Split.ValueType:
        return self._config.streams.split(user_id)

    async def _comparison_event(
        self, request: feedback_pb2.ComparisonRequest, event_id: str, counts: Counter[str]
    ) -> tuple[topics.Topic, Message, str]:
        by_id = {
            i: ref.generation_id
            for i, ref in enumerate(request.responses)
            if ref.WhichOneof("source") == "generation_id"
        }
        served = (
            await self._generations.resolve(
                by_id, self._config.resolver.wait_s, self._confirmed_after
            )
            if by_id
            else {}
        )
        prompt, _ = self._redact(request.prompt, counts)
        messages = self._redact_messages(request.messages, counts)
        # The policy server may publish the prompt as received or already redacted.
        asked = {(request.prompt, _turns(request.messages)), (prompt, _turns(messages))}
        texts = []
        for i, ref in enumerate(request.responses):
            if i in served:
                if (served[i].prompt, served[i].messages) not in asked:
                    what = "conversation" if request.messages else "prompt"
                    raise Rejection(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "prompt_mismatch",
                        f"responses[{i}].generation_id: {ref.generation_id[:64]!r} was served "
                        f"for a different {what}; rank only responses to this {what}",
                    )
                check_text(
                    f"responses[{i}] (served text)",
                    served[i].text,
                    self._config.limits.max_response_chars,
                )
                texts.append(served[i].text)
            else:
                texts.append(ref.text)
        check_distinct(texts)
        responses = []
        for i, text in enumerate(texts):
            redacted, changed = self._redact(text, counts)
            ref = request.responses[i]
            response = events_pb2.RankedResponse(
                text=redacted, rank=request.ranks[i], quality=ref.quality, flags=ref.flags
            )
            if i in served:
                response.generation_id = served[i].generation_id
                response.model_version = served[i].model_version
                # Token ids would spell out what was redacted, so they go with the redaction.
                if not changed:
                    response.token_ids.extend(served[i].token_ids)
                    response.logprobs.extend(served[i].logprobs)
            responses.append(response)
        event = events_pb2.ComparisonEvent(
            event_id=event_id,
            created_at_ms=int(self._clock() * 1000),
            prompt=prompt,
            messages=messages,
            responses=responses,
            labeler_id=request.labeler_id,
            user_id=request.user_id,
            split=self._split(request.user_id),
            idempotency_key=request.idempotency_key,
            redactions=sum(counts.values()),
        )
        return (
            self._config.streams.topics.comparisons,
            event,
            record_key(_key_text(prompt, messages)),
        )

    async def _demonstration_event(
        self, request: feedback_pb2.DemonstrationRequest, event_id: str, counts: Counter[str]
    ) -> tuple[topics.Topic, Message, str]:
        prompt, _ = self._redact(request.prompt, counts)
        messages = self._redact_messages(request.messages, counts)
        response, _ = self._redact(request.response, counts)
        event = events_pb2.DemonstrationEvent(
            event_id=event_id,
            created_at_ms=int(self._clock() * 1000),
            prompt=prompt,
            messages=messages,
            response=response,
            labeler_id=request.labeler_id,
            user_id=request.user_id,
            split=self._split(request.user_id),
            idempotency_key=request.idempotency_key,
            redactions=sum(counts.values()),
        )
        return (
            self._config.streams.topics.demonstrations,
            event,
            record_key(_key_text(prompt, messages)),
        )

    async def _submit(
        self,
        kind: str,
        idempotency_key: str,
        validate: Callable[[], None],
        build: Callable[[str, Counter[str]], Awaitable[tuple[topics.Topic, Message, str]]],
    ) -> Submitted:
        try:
            if not self._ready():
                raise Rejection(
                    grpc.StatusCode.UNAVAILABLE,
                    "unavailable",
                    "the gateway is starting: it is still reading its index of stored events "
                    "from Kafka; retry with the same idempotency key",
                )
            validate()
            event_id = event_id_for(kind, idempotency_key)
            if await self._already_stored(event_id):
                self.metrics.dedupe_hits.inc()
                return Submitted(event_id, duplicate=True, event=None)
            counts: Counter[str] = Counter()
            attempt = asyncio.get_running_loop().create_future()
            self._inflight[event_id] = attempt
            try:
                topic, event, key = await build(event_id, counts)
            except BaseException:
                self._inflight.pop(event_id, None)
                attempt.set_result(False)
                raise
            await self._store(kind, event_id, topic, event, key, counts, attempt)
        except Rejection as rejection:
            self.metrics.rejected.labels(kind, rejection.reason).inc()
            raise
        assert isinstance(event, events_pb2.ComparisonEvent | events_pb2.DemonstrationEvent)
        return Submitted(event_id, duplicate=False, event=event)

    async def _already_stored(self, event_id: str) -> bool:
        """True when the event is stored; waits for an unsettled earlier attempt first."""
        while event_id not in self._seen:
            attempt = self._inflight.get(event_id)
            if attempt is None:
                return False
            done, _ = await asyncio.wait((attempt,), timeout=self._config.kafka.ack_timeout_s)
            if not done:
                raise Rejection(
                    grpc.StatusCode.UNAVAILABLE,
                    "unavailable",
                    "an earlier submission with this idempotency key is still waiting for "
                    "Kafka; retry later with the same key",
                )
            if attempt.result():
                return True
        return True

    async def _store(
        self,
        kind: str,
        event_id: str,
        topic: topics.Topic,
        event: Message,
        key: str,
        counts: Counter[str],
        attempt: asyncio.Future[bool],
    ) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            # First use, or a new event loop (the importer runs one per file).
            if self._outbox is not None:
                self._outbox.close()
            self._outbox = Outbox(self._producer, loop)
        acked = self._outbox.send(topic, event, key)

        def settled(acked: asyncio.Future[None]) -> None:
            stored = acked.exception() is None
            if self._store_health is not None:
                if stored:
                    self._store_health.stored()
                else:
                    self._store_health.failed(f"{type(acked.exception()).__name__}")
            if stored:
                self._seen.add(event_id)
                self.metrics.accepted.labels(kind).inc()
                self.metrics.ack_seconds.observe(time.perf_counter() - started)
                self.metrics.pii.count(counts)
            self._inflight.pop(event_id, None)
            attempt.set_result(stored)

        acked.add_done_callback(settled)
        # asyncio.wait leaves ``acked`` running on timeout: a late ack still marks the event
        # stored, and a retry meanwhile waits for it instead of writing a second copy.
        done, _ = await asyncio.wait((acked,), timeout=self._config.kafka.ack_timeout_s)
        if not done:
            if self._store_health is not None:
                self._store_health.failed(f"no ack within {self._config.kafka.ack_timeout_s:g} s")
            raise Rejection(
                grpc.StatusCode.UNAVAILABLE,
                "unavailable",
                f"Kafka did not acknowledge the event within {self._config.kafka.ack_timeout_s:g} s; "
                "retry with the same idempotency key",
            )
        exc = acked.exception()
        if exc is not None:
            raise Rejection(
                grpc.StatusCode.UNAVAILABLE,
                "unavailable",
                f"Kafka did not store the event ({type(exc).__name__}: {exc}); retry with the "
                "same idempotency key",
            )


class GatewayApp:
    """A running gateway with its Kafka clients: what ``open_gateway`` returns and ``close`` ends."""

    def __init__(
        self,
        gateway: FeedbackGateway,
        producer: bus.Producer,
        tails: list[TopicTail],
        store_health: StoreHealth,
    ) -> None:
        self.gateway = gateway
        self._producer = producer
        self._tails = tails
        self._store_health = store_health

    @property
    def ready(self) -> bool:
        """Every tail has read the history that existed when it started."""
        return all(tail.wait_caught_up(0) for tail in self._tails)

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        return all(
            tail.wait_caught_up(max(0.0, deadline - time.monotonic())) for tail in self._tails
        )

    def close(self) -> None:
        self._store_health.stop()
        self.gateway.close()
        self._producer.flush(timeout_s=10)
        self._producer.close()
        for tail in self._tails:
            tail.stop()


Condition = Callable[[str, bool, str], None]


def open_gateway(
    config: GatewayConfig,
    registry: CollectorRegistry,
    *,
    on_condition: Condition = lambda _name, _ok, _detail: None,
    warn_after_s: float = 60.0,
) -> GatewayApp:
    """Starts the gateway's Kafka clients without waiting for Kafka.

    The index of stored events is rebuilt in the background (``GatewayApp.wait_ready``);
    until it is, submissions get UNAVAILABLE: without the index a retried submission could be
    stored twice. ``on_condition(name, ok, detail)`` reports what the gateway needs to serve
    whenever it changes: ``index`` (rebuilt), ``kafka`` (events can be stored),
    ``dedupe_tail`` and ``generations_tail`` (the topic tails run). While Kafka is down at
    start, the clients keep retrying and a warning is logged every ``warn_after_s``.
    """
    kafka = config.kafka
    producer = bus.Producer(
        kafka.bootstrap_servers,
        client_id=kafka.client_id,
        registry=registry,
        linger_ms=kafka.linger_ms,
        batch_size=kafka.batch_size,
        delivery_timeout_ms=kafka.delivery_timeout_ms,
    )
    system = config.streams.topics
    seen = SeenEvents()
    generations = GenerationIndex(config.resolver.max_entries, config.resolver.ttl_s)
    dedupe = TopicTail(
        kafka.bootstrap_servers,
        [system.comparisons, system.demonstrations],
        seen.add_record,
        client_id=f"{kafka.client_id}-dedupe",
        registry=registry,
        follow=kafka.follow_event_topics,
        # Only event ids are read; the broker checked each batch's CRC when it was written
        # and the trainer's consumer checks it again. Without the C crc32c package the
        # check costs more than everything else the tail does.
        check_crcs=False,
        report=lambda ok, detail: on_condition("dedupe_tail", ok, detail),
    )
    served = TopicTail(
        kafka.bootstrap_servers,
        [system.prompts],
        generations.add_record,
        client_id=f"{kafka.client_id}-generations",
        registry=registry,
        report=lambda ok, detail: on_condition("generations_tail", ok, detail),
    )
    tails = [dedupe, served]
    on_condition("index", False, "reading the index of stored events from Kafka")
    for tail in tails:
        tail.start()
    probe = bus.BrokerProbe(
        kafka.bootstrap_servers,
        [system.comparisons, system.demonstrations],
        client_id=f"{kafka.client_id}-probe",
        timeout_s=2.0,
    )
    store_health = StoreHealth(probe, lambda ok, detail: on_condition("kafka", ok, detail))
    app: GatewayApp | None = None
    gateway = FeedbackGateway(
        config, producer, generations, seen, registry, store_health=store_health,
        ready=lambda: app is not None and app.ready, confirmed_after=served.confirmed_after,
    )  # fmt: skip
    app = GatewayApp(gateway, producer, tails, store_health)

    def announce_ready() -> None:
        waited = 0.0
        while app is not None and not app.wait_ready(warn_after_s):
            waited += warn_after_s
            if store_health.stopped:
                return
            log.warning(
                "feedback gateway: still reading the index of stored events from Kafka at %s "
                "after %.0f s (NOT_SERVING meanwhile)", kafka.bootstrap_servers, waited,
            )  # fmt: skip
        on_condition("index", True, "")
        log.info(
            "feedback gateway ready: %d stored events, %d served generations indexed",
            len(seen), len(generations),
        )  # fmt: skip

    threading.Thread(target=announce_ready, name="gateway-index", daemon=True).start()
    return app
