"""Which model version serves which request: state derived from model events alone.

Every change (publish, promote, roll back, pin, canary) is a ``ModelEvent`` on the models
topic. ``ModelState`` folds those events, in topic order, into the serving state of one role,
so every replica that reads the topic from the beginning reaches the same state, including
one started long after the events were written. ``ModelFollower`` keeps a ``ModelState``
current from Kafka and, as a fallback for events that never made it to Kafka, from the
checkpoint registry on disk.

Routing a request (``ModelState.route``):
  pinned version, if any  >  canary version for ``share`` of user ids (sticky)  >  promoted.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from rlhf import bus, checkpoint, topics
from rlhf.supervise import Loop, Supervised
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)

Kind = events_pb2.ModelEventKind
ROLE_NAMES: dict[int, str] = {
    events_pb2.MODEL_ROLE_POLICY: "policy",
    events_pb2.MODEL_ROLE_REWARD: "reward",
}
ROLES: dict[str, int] = {name: role for role, name in ROLE_NAMES.items()}


@dataclass
class VersionInfo:
    version: str
    path: str
    parent: str = ""
    created_at_ms: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    round_type: str = ""


@dataclass
class ModelState:
    """The serving state of one role. Mutated only by ``apply``.

    A version some server REJECTED (it failed verification or warm-up) is never routed to:
    promotion falls back to the newest earlier promoted version that was not rejected, and a
    rejected pin or canary is ignored. Checkpoints are immutable, so a rejection is final; to
    retry, publish the model again as a new version. The methods taking ``excluded`` also
    skip versions a caller knows to be unusable without an event (the pool's own failures).
    """

    role: int
    versions: dict[str, VersionInfo] = field(default_factory=dict)
    # Promotion history, newest last; rolling back pops to an earlier entry.
    promoted_history: list[str] = field(default_factory=list)
    pinned: str | None = None
    canary: str | None = None
    canary_share: float = 0.0
    rejected: dict[str, str] = field(default_factory=dict)

    def usable(self, version: str | None, excluded: Collection[str] = ()) -> bool:
        return (
            version is not None
            and version in self.versions
            and version not in self.rejected
            and version not in excluded
        )

    def promoted_version(self, excluded: Collection[str] = ()) -> str | None:
        """The newest promoted version that is usable."""
        for version in reversed(self.promoted_history):
            if self.usable(version, excluded):
                return version
        return None

    def serving_version(self, excluded: Collection[str] = ()) -> str | None:
        """The version a request with no canary luck goes to."""
        if self.usable(self.pinned, excluded):
            return self.pinned
        return self.promoted_version(excluded)

    @property
    def promoted(self) -> str | None:
        return self.promoted_version()

    @property
    def serving(self) -> str | None:
        return self.serving_version()

    def apply(self, event: events_pb2.ModelEvent) -> bool:
        """Folds one event in; returns whether the state changed. Unknown versions are ignored
        (except PUBLISHED, which introduces them), so a bad admin call cannot route to nothing."""
        if event.role != self.role:
            return False
        v = event.version
        if event.kind == Kind.MODEL_EVENT_KIND_PUBLISHED:
            if v in self.versions:
                return False
            self.versions[v] = VersionInfo(
                v, event.path, event.parent_version, event.created_at_ms, dict(event.metrics),
                event.round_type,
            )  # fmt: skip
            return True
        if event.kind == Kind.MODEL_EVENT_KIND_REJECTED:
            changed = v not in self.rejected
            self.rejected.setdefault(v, event.reason)
            return changed
        if event.kind == Kind.MODEL_EVENT_KIND_UNPINNED:
            changed = self.pinned is not None
            self.pinned = None
            return changed
        if v not in self.versions:
            log.warning("ignoring %s of unknown version %r", Kind.Name(event.kind), v)
            return False
        if event.kind == Kind.MODEL_EVENT_KIND_PROMOTED:
            if self.promoted_history and self.promoted_history[-1] == v:
                return False
            self.promoted_history.append(v)
            if self.canary == v:
                self.canary, self.canary_share = None, 0.0
            return True
        if event.kind == Kind.MODEL_EVENT_KIND_ROLLED_BACK:
            if v in self.promoted_history:
                del self.promoted_history[self.promoted_history.index(v) + 1 :]
            else:
                self.promoted_history.append(v)
            return True
        if event.kind == Kind.MODEL_EVENT_KIND_PINNED:
            changed = self.pinned != v
            self.pinned = v
            return changed
        if event.kind == Kind.MODEL_EVENT_KIND_CANARY:
            share = min(max(event.canary_share, 0.0), 1.0)
            self.canary, self.canary_share = (v, share) if share > 0 else (None, 0.0)
            return True
        return False

    def previous_promoted(self) -> str | None:
        """The usable promoted version before the current one (what a rollback goes to)."""
        current = self.promoted
        if current is None:
            return None
        index = len(self.promoted_history) - 1 - self.promoted_history[::-1].index(current)
        for version in reversed(self.promoted_history[:index]):
            if version != current and self.usable(version):
                return version
        return None

    def route(self, user_id: str, excluded: Collection[str] = ()) -> str | None:
        """The version for a new request from ``user_id`` (sticky for the canary)."""
        if self.usable(self.pinned, excluded):
            return self.pinned
        if (
            self.usable(self.canary, excluded)
            and self.canary_share > 0
            and user_bucket(user_id) < self.canary_share
        ):
            return self.canary
        return self.promoted_version(excluded)

    def wanted(self, excluded: Collection[str] = ()) -> set[str]:
        """Versions that should be resident: what new requests can be routed to."""
        pinned = self.pinned if self.usable(self.pinned, excluded) else None
        canary = self.canary if self.usable(self.canary, excluded) else None
        return {v for v in (pinned, self.promoted_version(excluded), canary) if v}


def user_bucket(user_id: str) -> float:
    """A stable number in [0, 1) per user id, the same on every replica."""
    digest = hashlib.sha256(f"canary:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def model_event(
    kind: int,
    role: int,
    version: str,
    *,
    path: str = "",
    parent: str = "",
    metrics: dict[str, float] | None = None,
    canary_share: float = 0.0,
    reason: str = "",
    actor: str = "",
    round_type: str = "",
) -> events_pb2.ModelEvent:
    return events_pb2.ModelEvent(
        event_id=uuid.uuid4().hex,
        created_at_ms=int(time.time() * 1000),
        kind=kind,  # type: ignore[arg-type]
        role=role,  # type: ignore[arg-type]
        version=version,
        parent_version=parent,
        path=path,
        metrics=metrics or {},
        canary_share=canary_share,
        reason=reason,
        actor=actor,
        round_type=round_type,
    )


def published_events(
    manifest: checkpoint.Manifest, path: Path, *, auto_promote: bool, actor: str
) -> list[events_pb2.ModelEvent]:
    """The events announcing a new checkpoint: PUBLISHED, then PROMOTED when auto-promoting."""
    role = ROLES[manifest.role]
    events = [
        model_event(
            Kind.MODEL_EVENT_KIND_PUBLISHED, role, manifest.version, path=str(path),
            parent=manifest.parent or "", metrics=manifest.metrics, actor=actor,
            round_type=manifest.round_type,
        )
    ]  # fmt: skip
    if auto_promote:
        events.append(
            model_event(Kind.MODEL_EVENT_KIND_PROMOTED, role, manifest.version, actor=actor)
        )
    return events


class ModelFollower:
    """Keeps one ``ModelState`` per role current from the models topic and the registry.

    ``on_change(state)`` runs (in the follower thread) after every change. With Kafka, the
    follower first replays the models topic to its end, retrying with backoff for as long as
    Kafka is unreachable; nobody hears of any state before that (``caught_up``), and the
    registry is not consulted either: without the topic a rolled-back or rejected version
    could come back. With ``auto_promote_from_registry``, a version found on disk but never
    announced (the trainer published while Kafka was down) is treated as published, and the
    newest as promoted, once ``registry_grace_s`` has passed: a missed event still converges.

    ``report(condition, ok, detail)`` tells the server's health about ``models_topic`` (read
    to its end once) and ``model_follower`` (the supervised follower thread runs).
    """

    def __init__(
        self,
        *,
        roles: tuple[int, ...] = (events_pb2.MODEL_ROLE_POLICY, events_pb2.MODEL_ROLE_REWARD),
        bootstrap_servers: str | None,
        registry_dir: Path | None,
        on_change: Callable[[ModelState], None] = lambda _state: None,
        registry: CollectorRegistry | None = None,
        poll_registry_s: float = 5.0,
        registry_grace_s: float = 30.0,
        auto_promote_from_registry: bool = True,
        report: Callable[[str, bool, str], None] = lambda _name, _ok, _detail: None,
        component: str = "",
        topic: topics.Topic = topics.MODELS,
    ) -> None:
        """``topic``: the models topic as the deployment names it (``streams.topic_prefix``)."""
        self.states = {role: ModelState(role) for role in roles}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._on_change = on_change
        self._bootstrap_servers = bootstrap_servers
        self._metrics_registry = registry
        self._registry_dir = registry_dir
        self._poll_registry_s = poll_registry_s
        self._registry_grace_s = registry_grace_s
        self._auto_promote = auto_promote_from_registry
        self._report = report
        self._topic = topic
        self._applied: set[str] = set()
        # While replaying history nobody is told about intermediate states: a restarted
        # server must load the final state's versions, not every version ever promoted.
        self._replaying = False
        self._caught_up = threading.Event()
        # Registry versions that failed verification, with why (checkpoints are immutable).
        self._unusable: dict[str, str] = {}
        self._supervised = Supervised(
            "model-follower", self._body, registry=registry, component=component,
            report=lambda ok, detail: report("model_follower", ok, detail),
        )  # fmt: skip

    @property
    def caught_up(self) -> bool:
        """The models topic has been read to its end once (always true without Kafka)."""
        return self._caught_up.is_set()

    def start(self, wait_s: float = 30.0) -> bool:
        """Starts following; waits up to ``wait_s`` for the models topic to be read to its end
        (0: return at once) and returns whether it was."""
        if self._bootstrap_servers:
            self._report("models_topic", False, "the models topic has not been read yet")
        else:
            self._ready()
        self._supervised.start()
        return self._caught_up.wait(wait_s) if wait_s > 0 else self.caught_up

    def stop(self) -> None:
        self._supervised.stop()

    def _ready(self) -> None:
        """History known (after the first replay, or a restart's): adopt unannounced registry
        versions, then hand every state over (changes were not passed on while replaying)."""
        self.sync_registry(grace_s=0.0)
        for state in self.states.values():
            self._on_change(state)
        self._caught_up.set()

    def _consumer(self) -> bus.Consumer:
        assert self._bootstrap_servers
        # A group of its own: every replica reads the whole history.
        return bus.Consumer(
            self._bootstrap_servers, [self._topic],
            group_id=f"follower-{uuid.uuid4().hex[:12]}", client_id="model-follower",
            registry=self._metrics_registry,
        )  # fmt: skip

    def _replay(self, consumer: bus.Consumer, loop: Loop) -> None:
        """Reads the models topic to its end, retrying with backoff while Kafka is away."""
        backoff, last_warning = 0.5, float("-inf")
        self._replaying = True
        try:
            while not loop.stopping:
                try:
                    for record in consumer.poll(timeout_s=0.5):
                        self.apply(record.value)  # type: ignore[arg-type]
                    positions = consumer.positions()
                    if positions:
                        ends = consumer.end_offsets(timeout_s=5.0)
                        if all(positions.get(tp, 0) >= end for tp, end in ends.items()):
                            return
                    loop.healthy()
                    continue
                except KafkaError as exc:
                    if time.monotonic() - last_warning >= 30.0:
                        last_warning = time.monotonic()
                        log.warning("models topic not readable yet (%s); retrying, serving "
                                    "nothing meanwhile", exc)  # fmt: skip
                    if loop.wait(backoff):
                        return
                    backoff = min(5.0, backoff * 2)
        finally:
            self._replaying = False

    def _body(self, loop: Loop) -> None:
        consumer = self._consumer() if self._bootstrap_servers else None
        try:
            if consumer is not None:
                self._replay(consumer, loop)
                if loop.stopping:
                    return
                self._report("models_topic", True, "")
                self._ready()
            next_scan = time.monotonic() + self._poll_registry_s
            while not loop.stopping:
                if consumer is not None:
                    for record in consumer.poll(timeout_s=0.5):
                        self.apply(record.value)  # type: ignore[arg-type]
                else:
                    loop.wait(0.5)
                loop.healthy()
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + self._poll_registry_s
                    try:
                        self.sync_registry()
                    except OSError:
                        log.exception("registry scan failed")
        finally:
            if consumer is not None:
                consumer.close()

    def apply(self, event: events_pb2.ModelEvent) -> None:
        state = self.states.get(event.role)
        if state is None:
            return
        with self._lock:
            if event.event_id in self._applied:
                return  # a redelivered event
            self._applied.add(event.event_id)
            changed = state.apply(event)
            self._changed.notify_all()
        if changed and not self._replaying:
            self._on_change(state)

    def wait_for(self, event_id: str, timeout_s: float) -> bool:
        """Blocks until the event with ``event_id`` has been applied (or the timeout)."""
        with self._lock:
            return self._changed.wait_for(lambda: event_id in self._applied, timeout=timeout_s)

    def sync_registry(self, grace_s: float | None = None) -> None:
        """Adopts versions on disk that no event announced within the grace period."""
        if self._registry_dir is None:
            return
        grace_ms = 1000 * (self._registry_grace_s if grace_s is None else grace_s)
        now_ms = time.time() * 1000
        for role, state in self.states.items():
            role_name = ROLE_NAMES[role]
            on_disk = [
                v for v in checkpoint.list_versions(self._registry_dir, role_name)
                if v not in state.rejected and v not in self._unusable
            ]  # fmt: skip
            unseen = [v for v in on_disk if v not in state.versions]
            adoptable = []
            for version in unseen:
                path = self._registry_dir / role_name / version
                try:
                    manifest = checkpoint.read_manifest(path)
                except checkpoint.CheckpointError as exc:
                    self._mark_unusable(version, str(exc))
                    continue
                if now_ms - manifest.created_at_ms < grace_ms:
                    continue  # its PUBLISHED event is probably on its way
                try:
                    # No event vouches for it: only a version whose files check out is adopted.
                    checkpoint.verify(path)
                except checkpoint.CheckpointError as exc:
                    self._mark_unusable(version, str(exc))
                    continue
                adoptable.append((version, manifest, path))
            for version, manifest, path in adoptable:
                if state.versions:
                    log.warning(
                        "adopting %s from the registry: no model event announced it", version
                    )
                # Only the newest version on disk, so adopting never moves serving backwards.
                newest = [v for v in on_disk if v not in self._unusable][-1]
                promote = self._auto_promote and version == adoptable[-1][0] == newest
                for event in published_events(
                    manifest, path, auto_promote=promote, actor="registry"
                ):
                    self.apply(event)

    def _mark_unusable(self, version: str, reason: str) -> None:
        self._unusable[version] = reason
        log.error("registry version %s is not adopted: %s", version, reason)
