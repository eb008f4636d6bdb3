"""Configuration of the reward server (``rlhf serve reward``); env prefix ``RLHF_REWARD_``."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import option, section
from rlhf.runtime import RuntimeConfig
from rlhf.streams import StreamsConfig
from services.serving import FollowConfig, ModelConfig


@dataclass(frozen=True)
class LimitsConfig:
    max_responses: int = option(64, "most responses scored in one request")
    max_prompt_tokens: int = option(1024, "longest prompt accepted, in tokens")
    max_response_tokens: int = option(1024, "longest response accepted, in tokens (EOS included)")

    def __post_init__(self) -> None:
        if min(self.max_responses, self.max_prompt_tokens, self.max_response_tokens) < 1:
            raise ValueError("limits must be >= 1")


@dataclass(frozen=True)
class BatchConfig:
    max_batch_pairs: int = option(64, "(prompt, response) pairs scored in one forward pass")
    max_queue: int = option(256, "requests waiting to be scored before RESOURCE_EXHAUSTED")
    torch_threads: int = option(0, "torch CPU threads (0: torch's default)")

    def __post_init__(self) -> None:
        if self.max_batch_pairs < 1 or self.max_queue < 1:
            raise ValueError("batch.max_batch_pairs and batch.max_queue must be >= 1")


@dataclass(frozen=True)
class RewardRuntimeConfig(RuntimeConfig):
    # A subclass rather than a default_factory: parse_config builds nested sections from their
    # class defaults, so the service's own ports must be the class's defaults.
    port: int = option(50052, "gRPC port (0 picks a free port)")
    metrics_port: int = option(9102, "Prometheus /metrics port (0 picks a free port, -1 disables)")
    http_port: int = option(8002, "HTTP/JSON scoring API port (0 picks a free port, -1 disables)")


@dataclass(frozen=True)
class RewardServerConfig:
    model: ModelConfig = section(ModelConfig, "the reward model to serve")
    limits: LimitsConfig = section(LimitsConfig, "request limits")
    batch: BatchConfig = section(BatchConfig, "batched scoring")
    follow: FollowConfig = section(
        FollowConfig, "following the models topic and registry (hot swap; --model.registry only)"
    )
    streams: StreamsConfig = section(
        StreamsConfig, "topic names and splits, the same in every component", shared=True
    )
    runtime: RewardRuntimeConfig = section(
        RewardRuntimeConfig, "gRPC and HTTP servers, auth and metrics"
    )
