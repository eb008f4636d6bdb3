"""Configuration of the feedback gateway and the importer (``rlhf serve feedback``,
``rlhf feedback import``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.config import option
from rlhf.pii import KINDS
from rlhf.streams import StreamsConfig


@dataclass(frozen=True)
class LimitsConfig:
    max_prompt_chars: int = option(16_000, "longest accepted prompt, in characters")
    max_response_chars: int = option(16_000, "longest accepted response, in characters")
    max_id_chars: int = option(256, "longest accepted labeler id, user id or idempotency key")
    max_responses: int = option(9, "largest K in a comparison (the paper ranks 4..9)")
    max_bulk_items: int = option(
        10_000, "most items in one SubmitBulk stream (held until the stream ends)"
    )
    max_bulk_bytes: int = option(
        64 * 1024 * 1024, "most bytes of items in one SubmitBulk stream (held until it ends)"
    )

    def __post_init__(self) -> None:
        if min(self.max_prompt_chars, self.max_response_chars, self.max_id_chars) < 1:
            raise ValueError("limits must be positive")
        if self.max_bulk_items < 1 or self.max_bulk_bytes < 1:
            raise ValueError("limits: max_bulk_items and max_bulk_bytes must be positive")
        if not 2 <= self.max_responses <= 9:
            raise ValueError("max_responses must be within 2..9")


@dataclass(frozen=True)
class PolicyConfig:
    """Data policy from the paper, applied before anything is written."""

    pii_kinds: tuple[str, ...] = option(KINDS, f"PII kinds to redact, any of {list(KINDS)}")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.pii_kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown PII kinds {unknown}; known: {list(KINDS)}")


@dataclass(frozen=True)
class ResolverConfig:
    """The index of served generations that comparisons refer to by id."""

    max_entries: int = option(
        200_000, "served samples kept in memory (least recently used go first)"
    )
    ttl_s: float = option(7 * 24 * 3600.0, "a generation older than this is expired (NOT_FOUND)")
    wait_s: float = option(
        2.0, "how long a comparison waits for a generation id not yet read from rlhf.prompts"
    )

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.ttl_s <= 0 or self.wait_s < 0:
            raise ValueError("resolver: max_entries and ttl_s must be positive, wait_s >= 0")


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = option("localhost:9092", "Kafka bootstrap servers, comma-separated")
    client_id: str = option("rlhf-feedback", "Kafka client id of this process")
    ack_timeout_s: float = option(
        5.0, "a submission not acked by Kafka within this time gets UNAVAILABLE (retry is safe)"
    )
    linger_ms: int = option(5, "producer batching delay; concurrent submissions share a batch")
    batch_size: int = option(
        262_144, "producer batch size in bytes; large batches keep acks=all cheap under load"
    )
    delivery_timeout_ms: int = option(
        30_000, "the producer gives up on a record after this long (must exceed ack_timeout_s)"
    )

    follow_event_topics: bool = option(
        True,
        "keep reading rlhf.comparisons/demonstrations after start-up, so a retry sent to another "
        "replica is answered as a duplicate (costs about 0.1 ms CPU per event; a single replica "
        "can turn it off)",
    )

    def __post_init__(self) -> None:
        if self.ack_timeout_s <= 0 or self.linger_ms < 0:
            raise ValueError("kafka: ack_timeout_s must be > 0 and linger_ms >= 0")
        if self.delivery_timeout_ms < self.ack_timeout_s * 1000:
            raise ValueError("kafka: delivery_timeout_ms must be at least ack_timeout_s")


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the validation, policy and Kafka pipeline needs (server and importer).

    Sections use ``dataclasses.field`` rather than ``rlhf.config.section`` only so that ruff's
    RUF009 (function calls in dataclass defaults) stays quiet; the parser reads both alike.
    """

    kafka: KafkaConfig = field(
        default_factory=KafkaConfig, metadata={"help": "Kafka connection and producer"}
    )
    limits: LimitsConfig = field(
        default_factory=LimitsConfig, metadata={"help": "request size limits"}
    )
    policy: PolicyConfig = field(default_factory=PolicyConfig, metadata={"help": "PII redaction"})
    streams: StreamsConfig = field(
        default_factory=StreamsConfig,
        metadata={"help": "topic names and splits, the same in every component", "shared": True},
    )
    resolver: ResolverConfig = field(
        default_factory=ResolverConfig, metadata={"help": "generation id resolution"}
    )
