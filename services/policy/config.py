"""Configuration of the policy server (``rlhf serve policy``); env prefix ``RLHF_POLICY_``."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import option, section
from rlhf.runtime import RuntimeConfig
from services.serving import FollowConfig, ModelConfig


@dataclass(frozen=True)
class LimitsConfig:
    max_input_tokens: int = option(
        1024, "longest prompt accepted, in tokens (longer: INVALID_ARGUMENT)"
    )
    max_new_tokens: int = option(512, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = option(64, "max_new_tokens when a request leaves it unset")
    max_n: int = option(9, "largest number of samples per request (the paper ranks K = 4..9)")
    max_stop_sequences: int = option(8, "most stop sequences per request")
    max_stop_chars: int = option(64, "longest stop sequence, in characters")

    def __post_init__(self) -> None:
        if min(self.max_input_tokens, self.max_new_tokens, self.max_n) < 1:
            raise ValueError("limits.max_input_tokens, max_new_tokens and max_n must be >= 1")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens:
            raise ValueError("limits.default_max_new_tokens must be in 1..limits.max_new_tokens")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = option(32, "sequences decoded together in one forward pass")
    max_queue: int = option(256, "requests waiting for a batch slot before RESOURCE_EXHAUSTED")
    max_prefill_tokens: int = option(
        4096, "prompt tokens prefilled in one step (bounds step latency)"
    )
    torch_threads: int = option(0, "torch CPU threads (0: torch's default)")

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_queue, self.max_prefill_tokens) < 1:
            raise ValueError("engine sizes must be >= 1")


@dataclass(frozen=True)
class PublishConfig:
    bootstrap_servers: str = option(
        "", "Kafka bootstrap servers for served generations (empty: not published, logged at start)"
    )
    buffer_size: int = option(
        10_000, "served generations buffered for Kafka before new ones are dropped"
    )
    batch_size: int = option(256, "records sent before waiting for their acks")
    ack_timeout_s: float = option(15.0, "how long one send waits for Kafka's ack before retrying")
    max_backoff_s: float = option(10.0, "longest pause between retries while Kafka is unreachable")
    close_timeout_s: float = option(
        10.0, "how long shutdown waits for buffered records to be acked"
    )
    # The split is a pure function of the user id; these must equal the feedback gateway's
    # (policy.validation_fraction / policy.test_fraction there) so a user is in one split.
    validation_fraction: float = option(0.05, "share of user ids whose prompts go to validation")
    test_fraction: float = option(0.05, "share of user ids whose prompts go to test")

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.batch_size < 1:
            raise ValueError("publish.buffer_size and publish.batch_size must be >= 1")
        if min(self.validation_fraction, self.test_fraction) < 0:
            raise ValueError("publish split fractions must be >= 0")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "publish.validation_fraction + test_fraction must leave room for train"
            )


@dataclass(frozen=True)
class PolicyRuntimeConfig(RuntimeConfig):
    # A subclass rather than a default_factory: parse_config builds nested sections from their
    # class defaults, so the service's own ports must be the class's defaults.
    port: int = option(50051, "gRPC port (0 picks a free port)")
    metrics_port: int = option(9101, "Prometheus /metrics port (0 picks a free port, -1 disables)")


@dataclass(frozen=True)
class PolicyServerConfig:
    model: ModelConfig = section(ModelConfig, "the policy to serve")
    limits: LimitsConfig = section(LimitsConfig, "request limits")
    engine: EngineConfig = section(EngineConfig, "batching engine")
    publish: PublishConfig = section(PublishConfig, "publishing served generations to Kafka")
    follow: FollowConfig = section(
        FollowConfig, "following the models topic and registry (hot swap; --model.registry only)"
    )
    runtime: PolicyRuntimeConfig = section(PolicyRuntimeConfig, "gRPC server, auth and metrics")

    def __post_init__(self) -> None:
        if self.limits.max_n > self.engine.max_batch_size:
            raise ValueError("limits.max_n must not exceed engine.max_batch_size")
