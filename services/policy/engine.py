"""The ``GenerationEngine`` protocol: what the policy server and its model pool drive.

An engine loads and unloads model versions (``load`` / ``warm_up`` / ``unload``, called by the
pool in ``services/serving.py``), takes requests (``submit``: ``n`` samples of one tokenised
prompt on one loaded version) and hands back a ``Generation`` whose ``events()`` stream the
tokens and whose ``cancel()`` stops it; ``stats()`` says what it holds. Everything that is the
service's own stays outside the engine: generation ids, Kafka records, versions and routing,
auth, request validation.

Two engines implement it, chosen with ``--engine.kind``:

* ``native`` (``engines/native.py``): transformers models on any device, continuous batching
  over preallocated per-slot KV memory. The default, and what tests run; it runs in a worker
  process of the server (``engines/worker.py``), or in the server's (``--engine.worker-process
  false``).
* ``vllm`` (``engines/vllm.py``): each version is a vLLM OpenAI-compatible server process in
  its own environment, driven over HTTP. The production engine on GPUs.

Both turn token ids into text the same way (``SampleText``), so streamed token texts always
add up to the final text, and stop strings cut the text at the same place.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from transformers import PreTrainedTokenizerBase

from services.policy.sampling import Detokenizer, SamplingParams

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class QueueFull(Exception):
    """The engine's waiting queue is at its bound; the client should retry later."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


class GenerationFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "deadline", "stopped" (engine or its process gone) or "internal"

    def __reduce__(self) -> tuple:
        return (GenerationFailed, (self.reason, str(self)))


class FinishReason(enum.StrEnum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


class Policy(Protocol):
    """A model version loaded in an engine. Requests hold the one they started with."""

    @property
    def version(self) -> str: ...
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...
    @property
    def eos_token_ids(self) -> frozenset[int]: ...
    @property
    def max_context(self) -> int | None:
        """Longest prompt + new tokens one sequence may hold (None: no limit known)."""
        ...


@dataclass(frozen=True)
class SampleDone:
    index: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    token_texts: tuple[str, ...]
    text: str
    finish_reason: FinishReason


@dataclass(frozen=True)
class TokenEvent:
    """A new token of sample ``index``; on its last token, ``done`` holds the whole sample."""

    index: int
    token_id: int
    text: str
    logprob: float
    done: SampleDone | None = None


@dataclass(frozen=True)
class EngineStats:
    kind: str
    waiting: int  # requests not yet admitted
    running: int  # sequences (samples) being generated
    versions: tuple[str, ...]  # versions loaded in the engine
    kv_bytes: int = 0  # KV memory held (native engine; vLLM manages its own)
    kv_tokens_used: int = 0
    kv_tokens_total: int = 0


class Generation:
    """One request inside an engine: ``n`` samples of one prompt under one policy."""

    def __init__(
        self,
        policy: Any,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        n: int,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop | None,  # None: no loop here (worker.py)
        *,
        stream: bool = False,
        token_texts: bool = False,
    ) -> None:
        self.policy = policy
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.n = n
        self.deadline = deadline  # time.monotonic() value, or None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.stream = stream
        # Text as it grows is needed to stream it, to report it per token, or to find a stop
        # sequence; otherwise one decode at the end is enough.
        self.incremental_text = stream or token_texts or bool(params.stop)
        self._loop = loop
        self._events: asyncio.Queue[list[TokenEvent | GenerationFailed]] = asyncio.Queue()
        # Written by the server's event loop, read by the engine between steps.
        self._cancelled = False
        self.failed = False
        self.on_cancel: Callable[[], None] | None = None

    def cancel(self) -> None:
        """Stops generating at the next step (the client went away or its deadline passed)."""
        self._cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def deliver(self, events: list[TokenEvent | GenerationFailed]) -> None:
        """Hands events to the request's event loop (from any thread)."""
        deliver_all({self: events})

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Token events of all samples as they are produced; raises GenerationFailed."""
        done = 0
        while done < self.n:
            for event in await self._events.get():
                if isinstance(event, GenerationFailed):
                    raise event
                if event.done is not None:
                    done += 1
                yield event

    async def result(self) -> list[SampleDone]:
        """Waits for all samples; ordered by index."""
        samples = [e.done async for e in self.events() if e.done is not None]
        return sorted(samples, key=lambda s: s.index)


def deliver_all(events: Mapping[Generation, list[TokenEvent | GenerationFailed]]) -> None:
    """Hands each request its events, from any thread: one wake-up per event loop, however
    many requests it serves (each wake-up of another thread's loop costs a GIL hand-over)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, list]]] = {}
    for gen, items in events.items():
        if gen._loop is not None:
            by_loop.setdefault(gen._loop, []).append((gen, items))
    for loop, batch in by_loop.items():
        # A closed loop means the server is gone and nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[Generation, list]]) -> None:
    for gen, items in batch:
        gen._events.put_nowait(items)


@dataclass
class SampleText:
    """One sample's tokens and text as they grow: the same rules in every engine.

    ``push`` appends a token and returns its text and, when the sample ends with it, why.
    The token texts always add up to ``text``: a stop string cuts the text (and the token
    that completed it) right after the stop, as TGI does, and bytes held back for a character
    the sample never completed go out with the last token.
    """

    gen: Generation
    index: int
    detok: Detokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    text: str = ""

    @classmethod
    def of(cls, gen: Generation, index: int) -> SampleText:
        tokenizer = gen.policy.tokenizer
        return cls(gen, index, Detokenizer(tokenizer, gen.prompt_ids[-4:]))

    def push(self, token: int, logprob: float, eos: bool) -> tuple[str, FinishReason | None]:
        gen = self.gen
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        reason = None
        delta = ""
        if eos:
            reason = FinishReason.EOS_TOKEN
        elif gen.incremental_text:
            delta = self.detok.push(token)
            before = len(self.text)
            self.text += delta
            reason = self._stop_hit(delta)
            delta = self.text[before:]
        if reason is None and len(self.token_ids) >= gen.params.max_new_tokens:
            reason = FinishReason.LENGTH
        if gen.incremental_text and reason is not None and reason is not FinishReason.STOP_SEQUENCE:
            tail = self.detok.flush()
            delta += tail
            self.text += tail
        self.texts.append(delta)
        return delta, reason

    def _stop_hit(self, delta: str) -> FinishReason | None:
        for stop in self.gen.params.stop:
            # Only the tail can hold a stop string that this token completed.
            at = self.text.find(stop, max(0, len(self.text) - len(delta) - len(stop) + 1))
            if at >= 0:
                self.text = self.text[: at + len(stop)]
                return FinishReason.STOP_SEQUENCE
        return None

    def done(self, reason: FinishReason) -> SampleDone:
        text = self.text
        if not self.gen.incremental_text:
            # The EOS token is in token_ids (training sees the sample ended) but never in the text.
            ids = self.token_ids[:-1] if reason is FinishReason.EOS_TOKEN else self.token_ids
            text = self.detok.decode_all(ids)
        return SampleDone(
            self.index, tuple(self.token_ids), tuple(self.logprobs), tuple(self.texts), text, reason
        )


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str = "rlhf_policy") -> None:
        def hist(
            name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
        ) -> Histogram:
            return Histogram(f"{prefix}_{name}", doc, labels, buckets=buckets, registry=registry)

        self.queue_size = Gauge(
            f"{prefix}_queue_size", "Requests waiting for a batch slot", registry=registry
        )
        self.running = Gauge(
            f"{prefix}_running_sequences", "Sequences being decoded", registry=registry
        )
        self.kv_used = Gauge(
            f"{prefix}_kv_cache_usage_ratio",
            "Share of the preallocated KV memory holding tokens (native engine)",
            registry=registry,
        )
        self.batch_size = hist("batch_size", "Sequences per decode step", TOKEN_BUCKETS)
        self.step_tokens = hist(
            "step_tokens", "Tokens per forward pass (decode rows + prefill chunks)", TOKEN_BUCKETS
        )
        self.forward = hist(
            "forward_duration_seconds", "Forward pass duration", LATENCY_BUCKETS, ["phase"]
        )
        self.queue_time = hist(
            "queue_duration_seconds", "Time from submission to admission", LATENCY_BUCKETS
        )
        self.ttft = hist(
            "time_to_first_token_seconds", "Time from submission to first token", LATENCY_BUCKETS
        )
        self.tpot = hist(
            "time_per_output_token_seconds", "Mean time between tokens of a sample", LATENCY_BUCKETS
        )
        self.prompt_tokens = hist(
            "prompt_tokens", "Prompt length in tokens per request", TOKEN_BUCKETS
        )
        self.generation_tokens = hist(
            "generation_tokens", "Generated tokens per sample", TOKEN_BUCKETS
        )
        self.generated = Counter(
            f"{prefix}_generated_tokens", "Tokens generated", registry=registry
        )
        self.prefix_hit_tokens = Counter(
            f"{prefix}_prefix_cache_hit_tokens",
            "Prompt tokens whose keys and values came from the prefix cache (native engine)",
            registry=registry,
        )
        self.finished = Counter(
            f"{prefix}_samples_finished",
            "Samples finished, by reason",
            ["reason"],
            registry=registry,
        )
        self.aborted = Counter(
            f"{prefix}_requests_aborted",
            "Requests stopped before the end: cancelled, deadline, stopped or internal error",
            ["reason"],
            registry=registry,
        )
        # Exported as 0 from the start, so rates and alerts have a series to work on.
        for reason in FinishReason:
            self.finished.labels(reason.value)
        for why in ("cancelled", "deadline", "stopped", "internal"):
            self.aborted.labels(why)

    def first_token(self, gen: Generation, now: float) -> None:
        if gen.first_token_at is None:
            gen.first_token_at = now
            self.ttft.observe(now - gen.submitted_at)

    def sample_done(self, gen: Generation, done: SampleDone, now: float) -> None:
        count = len(done.token_ids)
        self.finished.labels(done.finish_reason.value).inc()
        self.generation_tokens.observe(count)
        if count > 1 and gen.first_token_at is not None:
            self.tpot.observe((now - gen.first_token_at) / (count - 1))


class GenerationEngine(Protocol):
    """What the policy server and its model pool use; see the module docstring."""

    kind: str

    def load(self, path: Path, version: str) -> Any:
        """Loads the version in ``path`` (checksums are the pool's job); returns a Policy."""
        ...

    def warm_up(self, policy: Any) -> None:
        """A real generation before the version takes requests; raises if it is broken."""
        ...

    def unload(self, policy: Any) -> None:
        """Frees what the version holds once the pool released it (its last request ended)."""
        ...

    def submit(
        self,
        policy: Any,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        n: int = 1,
        deadline: float | None = None,
        *,
        stream: bool = False,
        token_texts: bool = False,
    ) -> Generation:
        """Queues a request (from the server's event loop); raises QueueFull / EngineStopped.

        ``stream``: deliver every token as it comes (else only finished samples, which saves
        the event loop a wake-up per token). ``token_texts``: fill ``SampleDone.token_texts``.
        """
        ...

    def stats(self) -> EngineStats: ...

    def wait_idle(self, timeout_s: float) -> bool:
        """Blocks until nothing is queued or running (True), or the timeout (False)."""
        ...

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops taking requests; those still running fail with reason 'stopped'."""
        ...
