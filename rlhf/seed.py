"""``rlhf model seed``: a new registry's first versions, announced on the models topic.

Seeding is idempotent, so a failed run is repaired by running the same command again:

* before writing anything, it checks that Kafka answers and the models topic exists (the
  broker does not create topics: ``rlhf kafka topics`` does), so a run that cannot announce
  leaves the registry untouched;
* each role's seed version is the registry's ``init`` version when there is one (a run that
  published it and then failed to announce it), else ``<base>/<role>`` is published now;
* its PUBLISHED event is sent unless the models topic already has one for that version, and
  its PROMOTED event unless any version of the role was ever promoted (re-running the command
  on a live system must never move serving back to the base model).

Announcements carry deterministic event ids (``announcement_id``), the same ids the trainer
gives the events of the versions it publishes, so a version is never announced twice under
two ids.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rlhf import bus, checkpoint, topics
from rlhf.config import option, section
from rlhf.lifecycle import ROLES, Kind, published_events
from rlhf.streams import StreamsConfig
from rlhf.v1 import events_pb2

ROLE_NAMES = ("policy", "reward")
# Shared with trainer/registry.py's announcements: one id per (event kind, version).
_ANNOUNCEMENTS = uuid.UUID("3c1f6b1e-94a2-4a53-8f51-0d6f8a7e2c40")


class SeedError(RuntimeError):
    """Seeding could not finish; the message says what to do (re-running is safe)."""


@dataclass(frozen=True)
class SeedConfig:
    registry: str = option("registry", "checkpoint registry to seed")
    base: str = option(
        "models/tiny", "directory holding policy/ and reward/ (from `rlhf model init`)"
    )
    bootstrap_servers: str = option(
        "", "Kafka to announce the versions on (empty: servers find them in the registry)"
    )
    timeout_s: float = option(60.0, "how long to wait for Kafka (reading and acks)")
    streams: StreamsConfig = section(
        StreamsConfig, "topic names and splits, the same in every component", shared=True
    )


@dataclass
class Announced:
    """What the models topic already says about versions, per role name."""

    published: dict[str, set[str]] = field(default_factory=dict)
    promoted: dict[str, set[str]] = field(default_factory=dict)

    def add(self, event: events_pb2.ModelEvent) -> None:
        role = {v: k for k, v in ROLES.items()}.get(event.role)
        if role is None:
            return
        if event.kind == Kind.MODEL_EVENT_KIND_PUBLISHED:
            self.published.setdefault(role, set()).add(event.version)
        elif event.kind in (Kind.MODEL_EVENT_KIND_PROMOTED, Kind.MODEL_EVENT_KIND_ROLLED_BACK):
            self.promoted.setdefault(role, set()).add(event.version)


def announcement_id(kind: int, version: str) -> str:
    return uuid.uuid5(_ANNOUNCEMENTS, f"{Kind.Name(kind)}:{version}").hex  # type: ignore[arg-type]


def read_announced(
    bootstrap_servers: str, timeout_s: float, topic: topics.Topic = topics.MODELS
) -> Announced:
    """Reads the models topic to its end (it is small and compacted)."""
    consumer = bus.Consumer(
        bootstrap_servers, [topic], group_id=f"rlhf-seed-{uuid.uuid4().hex[:12]}",
        client_id="rlhf-seed",
    )  # fmt: skip
    announced = Announced()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for record in consumer.poll(timeout_s=0.5):
                announced.add(record.value)  # type: ignore[arg-type]
            positions = consumer.positions()
            if positions:
                ends = consumer.end_offsets(timeout_s=max(1.0, deadline - time.monotonic()))
                if all(positions.get(tp, 0) >= end for tp, end in ends.items()):
                    return announced
    finally:
        consumer.close()
    raise SeedError(f"could not read {topic.name} to its end within {timeout_s:g} s")


def _seed_version(registry: Path, base: Path, role: str) -> checkpoint.Manifest | None:
    """The role's init version, published from ``base`` if the registry has none; None when
    the registry already holds other versions of the role (it was seeded another way)."""
    versions = checkpoint.list_versions(registry, role)
    for version in versions:
        manifest = checkpoint.read_manifest(registry / role / version)
        if manifest.round_type == "init":
            return manifest
    if versions:
        return None
    return checkpoint.publish(
        registry, role, base / role, round_type="init", parent=None, metrics={}, offsets={}
    )


def seed_registry(
    registry: Path,
    base: Path,
    producer: bus.Producer | None,
    *,
    announced: Announced | None = None,
    actor: str = "seed",
    ack_timeout_s: float = 10.0,
    topic: topics.Topic = topics.MODELS,
) -> list[checkpoint.Manifest]:
    """Publishes ``<base>/policy`` and ``<base>/reward`` (e.g. from ``rlhf model init`` or a
    pretrained model) as each role's first version and announces it (see the module doc);
    returns each role's seed version. ``announced``: what the models topic already holds
    (``read_announced``; None: nothing). Without a producer the servers find the versions by
    scanning the registry. Raises ``SeedError`` when an announcement is not acked."""
    announced = announced or Announced()
    out = []
    for role in ROLE_NAMES:
        manifest = _seed_version(registry, base, role)
        if manifest is None:
            continue
        out.append(manifest)
        if producer is None:
            continue
        path = (registry / role / manifest.version).resolve()
        ever_promoted = bool(announced.promoted.get(role))
        for event in published_events(manifest, path, auto_promote=True, actor=actor):
            if event.kind == Kind.MODEL_EVENT_KIND_PUBLISHED:
                if manifest.version in announced.published.get(role, set()):
                    continue
            elif ever_promoted:
                continue
            event.event_id = announcement_id(event.kind, manifest.version)
            event.created_at_ms = manifest.created_at_ms
            try:
                producer.send_sync(topic, event, key=event.event_id, timeout_s=ack_timeout_s)
            except bus.PublishError as exc:
                raise SeedError(
                    f"{manifest.version} is in the registry but its {Kind.Name(event.kind)} "
                    f"event was not acked ({exc}); run the same command again"
                ) from exc
    return out


def run(cfg: SeedConfig) -> list[checkpoint.Manifest]:
    """What ``rlhf model seed`` does; raises ``SeedError`` with what to do."""
    producer = None
    announced = None
    models_topic = cfg.streams.topics.models
    if cfg.bootstrap_servers:
        try:
            missing = bus.missing_topics(cfg.bootstrap_servers, [models_topic], cfg.timeout_s)
        except bus.KafkaUnavailable as exc:
            raise SeedError(f"{exc}; nothing was written") from exc
        if missing:
            raise SeedError(
                f"topic {', '.join(missing)} does not exist on {cfg.bootstrap_servers}; create "
                f"the topics with `rlhf kafka topics --bootstrap-servers "
                f"{cfg.bootstrap_servers}` (with the same --streams.topic-prefix; nothing "
                "was written)"
            )
        announced = read_announced(cfg.bootstrap_servers, cfg.timeout_s, models_topic)
        producer = bus.Producer(cfg.bootstrap_servers, client_id="rlhf-seed")
    try:
        return seed_registry(
            Path(cfg.registry), Path(cfg.base), producer, announced=announced,
            ack_timeout_s=cfg.timeout_s, topic=models_topic,
        )  # fmt: skip
    finally:
        if producer is not None:
            producer.close()


def main(cfg: SeedConfig) -> int:
    try:
        seeded = run(cfg)
    except (SeedError, checkpoint.CheckpointError, OSError) as exc:
        print(f"rlhf model seed: {exc}", flush=True)
        return 1
    print(json.dumps({m.role: m.version for m in seeded}))
    return 0
