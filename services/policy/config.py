"""Configuration of the policy server (``rlhf serve policy``); env prefix ``RLHF_POLICY_``."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import option, section
from rlhf.pii import KINDS
from rlhf.runtime import RuntimeConfig
from rlhf.streams import StreamsConfig
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


ENGINES = ("native", "vllm")


@dataclass(frozen=True)
class EngineConfig:
    kind: str = option(
        "native",
        "generation engine: native (transformers, in process) or vllm (a vLLM server process "
        "per model version; see --vllm.*)",
    )
    max_batch_size: int = option(32, "sequences decoded together (native: KV slots per version)")
    max_queue: int = option(256, "requests waiting for a batch slot before RESOURCE_EXHAUSTED")
    max_step_tokens: int = option(
        2048,
        "tokens per forward pass, decode rows + prompt chunks (native; bounds step latency, "
        "longer prompts are prefilled in chunks)",
    )
    max_seq_len: int = option(
        0,
        "KV slot length in tokens (native; 0: limits.max_input_tokens + limits.max_new_tokens)",
    )
    prefix_cache_tokens: int = option(
        8192,
        "prompt tokens whose keys and values the native engine keeps per version for reuse by "
        "prompts that start the same way (0: off)",
    )
    worker_process: bool = option(
        True,
        "native: run the engine (weights, KV memory, step loop) in a child process, so the "
        "server's own work (gRPC, HTTP, templates, tokenisation) runs beside it instead of "
        "taking turns with it under one interpreter lock (false: in the server's process)",
    )
    torch_threads: int = option(0, "torch CPU threads (0: torch's default)")
    cpus: str = option(
        "",
        "CPUs the engine computes on, a list like 3 or 2-7,12 (native in its worker process: "
        "its step thread is pinned to them, the server's threads and the worker's pipe reader "
        "to the other CPUs; native "
        "in the server's process: the whole process; vllm CPU builds: its OpenMP threads, "
        "VLLM_CPU_OMP_THREADS_BIND). Empty: the OS places every thread",
    )
    switch_interval_ms: float = option(
        0.5, "Python's thread switch interval: how long the event loop may wait for the GIL"
    )

    def __post_init__(self) -> None:
        if self.switch_interval_ms <= 0:
            raise ValueError("engine.switch_interval_ms must be > 0")
        if self.kind not in ENGINES:
            raise ValueError(f"engine.kind must be one of {', '.join(ENGINES)}, got {self.kind!r}")
        if min(self.max_batch_size, self.max_queue, self.max_step_tokens) < 1:
            raise ValueError("engine sizes must be >= 1")
        if self.max_step_tokens <= self.max_batch_size:
            raise ValueError("engine.max_step_tokens must exceed engine.max_batch_size")
        if self.prefix_cache_tokens < 0:
            raise ValueError("engine.prefix_cache_tokens must be >= 0")
        if self.max_seq_len < 0:
            raise ValueError("engine.max_seq_len must be >= 0")
        parse_cpus(self.cpus)


# Linux's largest CPU number (NR_CPUS); a range past it is a typo, not a machine.
MAX_CPUS = 8192


def parse_cpus(text: str) -> frozenset[int]:
    """The CPU numbers of a list like ``3`` or ``2-7,12`` (empty: none); ValueError if malformed."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(
                f"engine.cpus: {part!r} is neither a CPU number nor a range like 2-7"
            ) from None
        if not 0 <= low <= high < MAX_CPUS:
            raise ValueError(f"engine.cpus: {part!r} is not a range of CPUs 0..{MAX_CPUS - 1}")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


@dataclass(frozen=True)
class VLLMConfig:
    python: str = option(
        "",
        "python of an environment with vLLM (empty: the one scripts/vllm_env.sh builds and "
        "caches under ~/.cache/rlhf)",
    )
    gpu_memory_utilization: float = option(
        0.45,
        "share of GPU memory each version's vLLM process takes (weights + KV cache); a swap "
        "runs two side by side, so keep it under 0.5",
    )
    cpu_kv_cache_gb: int = option(
        1, "KV cache GiB per process on CPU builds (VLLM_CPU_KVCACHE_SPACE)"
    )
    tensor_parallel_size: int = option(1, "GPUs per version (vLLM --tensor-parallel-size)")
    max_num_seqs: int = option(0, "vLLM --max-num-seqs (0: engine.max_batch_size)")
    threads: int = option(0, "CPU builds: OpenMP threads per process (0: vLLM's default)")
    start_timeout_s: float = option(900.0, "how long a version's process may take to serve")
    extra_args: tuple[str, ...] = option((), "more `vllm serve` arguments, comma-separated")

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("vllm.gpu_memory_utilization must be in (0, 1]")
        if self.tensor_parallel_size < 1 or self.start_timeout_s <= 0:
            raise ValueError("vllm.tensor_parallel_size must be >= 1, start_timeout_s > 0")


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
    # The same rules as the feedback gateway's policy.pii_kinds (rlhf/pii.py).
    pii_kinds: tuple[str, ...] = option(
        KINDS, f"PII kinds redacted from published prompts and samples, any of {list(KINDS)}"
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.pii_kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"publish.pii_kinds: unknown kinds {unknown}; known: {list(KINDS)}")
        if self.buffer_size < 1 or self.batch_size < 1:
            raise ValueError("publish.buffer_size and publish.batch_size must be >= 1")


@dataclass(frozen=True)
class ApiConfig:
    served_model_name: str = option(
        "policy",
        "the model name HTTP clients send (OpenAI 'model', TGI 'model') for the server's choice of "
        "version (pinned, canary or promoted); a resident version's own name selects that version",
    )

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("api.served_model_name must not be empty")


@dataclass(frozen=True)
class PolicyRuntimeConfig(RuntimeConfig):
    # A subclass rather than a default_factory: parse_config builds nested sections from their
    # class defaults, so the service's own ports must be the class's defaults.
    port: int = option(50051, "gRPC port (0 picks a free port)")
    metrics_port: int = option(9101, "Prometheus /metrics port (0 picks a free port, -1 disables)")
    http_port: int = option(
        8001, "HTTP port of the OpenAI and TGI APIs (0 picks a free port, -1 disables)"
    )


@dataclass(frozen=True)
class PolicyServerConfig:
    model: ModelConfig = section(ModelConfig, "the policy to serve")
    limits: LimitsConfig = section(LimitsConfig, "request limits")
    engine: EngineConfig = section(EngineConfig, "generation engine")
    vllm: VLLMConfig = section(VLLMConfig, "the vLLM engine (--engine.kind vllm)")
    publish: PublishConfig = section(PublishConfig, "publishing served generations to Kafka")
    # Topic names and split fractions: the same in every component (rlhf/streams.py).
    streams: StreamsConfig = section(
        StreamsConfig, "topic names and splits, the same in every component", shared=True
    )
    follow: FollowConfig = section(
        FollowConfig, "following the models topic and registry (hot swap; --model.registry only)"
    )
    api: ApiConfig = section(ApiConfig, "the OpenAI- and TGI-compatible HTTP APIs")
    runtime: PolicyRuntimeConfig = section(
        PolicyRuntimeConfig, "gRPC and HTTP servers, auth and metrics"
    )

    def __post_init__(self) -> None:
        if self.limits.max_n > self.engine.max_batch_size:
            raise ValueError("limits.max_n must not exceed engine.max_batch_size")
        if 0 < self.engine.max_seq_len < self.limits.max_input_tokens + self.limits.max_new_tokens:
            raise ValueError(
                "engine.max_seq_len must hold limits.max_input_tokens + limits.max_new_tokens"
            )
        cpus = len(parse_cpus(self.engine.cpus))
        if self.engine.kind == "vllm" and 0 < cpus < self.vllm.tensor_parallel_size:
            raise ValueError(
                f"engine.cpus names {cpus} CPUs for vllm.tensor_parallel_size "
                f"{self.vllm.tensor_parallel_size}: each rank needs one at least"
            )

    @property
    def seq_len(self) -> int:
        """Tokens one sequence may hold: prompt and new tokens."""
        return self.engine.max_seq_len or self.limits.max_input_tokens + self.limits.max_new_tokens
