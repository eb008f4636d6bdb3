"""The generation engine: iteration-level (continuous) batching over a KV cache.

One worker thread owns the model's forward passes. Between two decode steps it admits waiting
requests (prefilled together, left-padded, their KV caches then joined to the running batch),
and it drops finished, cancelled and expired sequences, so concurrent requests share every
forward pass and a short request never waits for a long one. A request's ``n`` samples share
one prefill of the prompt (its cache rows are repeated), then decode side by side. The batch
state (KV rows, joining, trimming) is in ``kvbatch.py``, token selection in ``sampling.py``.

Each request keeps the ``LoadedPolicy`` (model, tokenizer, version) it started with: sequences
are batched per policy object, so during a model swap both versions decode, and the old one
is released when its last sequence ends.

transformers' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``,
5.23) runs on CPU but does not fit a serving API: ``do_sample`` and the sampler's RNG are
global to the manager (no per-request seeds, no greedy next to sampled requests), there is no
repetition penalty or stop sequence per request, its logprobs are taken after temperature, and
on CPU it ran the tiny model at ~66 tokens/s (32 requests x 32 tokens, one thread), against
~1,350 for plain one-at-a-time ``generate`` and ~16,000 for this engine at batch 32.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from services.policy.kvbatch import KVBatch
from services.policy.sampling import (
    Detokenizer,
    RowState,
    SamplingParams,
    sample_seed,
    select_tokens,
)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class QueueFull(Exception):
    """The engine's waiting queue is at its bound; the client should retry later."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


class GenerationFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "deadline", "stopped" or "internal"


class FinishReason(enum.StrEnum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True, eq=False)
class LoadedPolicy:
    """A model version ready to serve. Requests hold the one they started with."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    version: str
    eos_token_ids: frozenset[int]

    @classmethod
    def of(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, version: str
    ) -> LoadedPolicy:
        eos = model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return cls(model, tokenizer, version, frozenset(ids))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


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


class Generation:
    """One request inside the engine: ``n`` samples of one prompt under one policy."""

    def __init__(
        self,
        policy: LoadedPolicy,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        n: int,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.policy = policy
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.n = n
        self.deadline = deadline  # time.monotonic() value, or None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.stream = False
        self.incremental_text = True
        self._loop = loop
        self._events: asyncio.Queue[list[TokenEvent | GenerationFailed]] = asyncio.Queue()
        # Written by the server's event loop, read by the worker between steps.
        self._cancelled = False
        self._failed = False

    def cancel(self) -> None:
        """Stops generating at the next step (the client went away or its deadline passed)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _deliver(self, events: list[TokenEvent | GenerationFailed]) -> None:
        # A closed loop means the server is gone and nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._events.put_nowait, events)

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
        self.batch_size = hist("batch_size", "Sequences per decode step", TOKEN_BUCKETS)
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


@dataclass
class _Seq:
    gen: Generation
    index: int
    row: RowState
    detok: Detokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    text: str = ""


class Engine:
    """Continuous batching over any number of resident policies (see module doc)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_prefill_tokens: int = 4096,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = EngineMetrics(registry)
        self._cond = threading.Condition()
        self._waiting: collections.deque[Generation] = collections.deque()
        self._batches: dict[int, KVBatch[_Seq]] = {}  # id(policy) -> batch
        self._outbox: dict[Generation, list[TokenEvent | GenerationFailed]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="policy-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ server side

    def submit(
        self,
        policy: LoadedPolicy,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        n: int = 1,
        deadline: float | None = None,
        *,
        stream: bool = False,
        token_texts: bool = False,
    ) -> Generation:
        """Queues a request (call from the server's event loop); raises QueueFull / EngineStopped.

        ``stream``: deliver every token as it comes (else only finished samples, which saves
        the event loop a wake-up per token). ``token_texts``: fill ``SampleDone.token_texts``.
        """
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"n must be in 1..{self.max_batch_size}, got {n}")
        gen = Generation(policy, prompt_ids, params, n, deadline, asyncio.get_running_loop())
        gen.stream = stream
        # Text as it grows is needed to stream it, to report it per token, or to find a stop
        # sequence; otherwise one decode at the end is enough.
        gen.incremental_text = stream or token_texts or bool(params.stop)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue)")
            self._waiting.append(gen)
            self.metrics.queue_size.set(len(self._waiting))
            self._cond.notify_all()
        self.metrics.prompt_tokens.observe(len(gen.prompt_ids))
        return gen

    def running_sequences(self) -> int:
        with self._cond:
            return sum(len(b.rows) for b in self._batches.values())

    def wait_queued(self, count: int, timeout_s: float) -> bool:
        """Blocks until at least ``count`` requests wait for a batch slot (True) or the timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._waiting) >= count, timeout_s)

    def wait_idle(self, timeout_s: float) -> bool:
        """Blocks until nothing is queued or running (True), or ``timeout_s`` passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._waiting and not self._batches, timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the worker; requests still queued or running fail with reason 'stopped'."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)
        with self._cond:
            leftovers = list(self._waiting) + [
                s.gen for b in self._batches.values() for s in b.rows
            ]
            self._waiting.clear()
            self._batches.clear()
        for gen in dict.fromkeys(leftovers):
            self._fail(gen, "stopped", "the server is shutting down")
        self._flush()

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._batches:
                        self._cond.wait()
                    if self._stopping:
                        return
                    admitted = self._admit()
                try:
                    self._drop_abandoned()
                    for group in _by_policy(admitted):
                        self._prefill(group)
                    for key in list(self._batches):
                        self._decode(key)
                except Exception:  # a bug must not take the whole server down with it
                    log.exception("engine step failed; failing the requests of this step")
                    with self._cond:
                        gens = [s.gen for b in self._batches.values() for s in b.rows] + admitted
                        self._batches.clear()
                    for gen in dict.fromkeys(gens):
                        self._fail(gen, "internal", "generation failed inside the engine")
                self._flush()
                with self._cond:
                    running = sum(len(b.rows) for b in self._batches.values())
                    if not running and not self._waiting:
                        self._cond.notify_all()  # wakes wait_idle callers
                self.metrics.running.set(running)

    def _admit(self) -> list[Generation]:
        """Pops the requests that fit into the batch now (FIFO; called with the lock held)."""
        running = sum(len(b.rows) for b in self._batches.values())
        admitted: list[Generation] = []
        prefill_tokens = 0
        now = time.monotonic()
        while self._waiting:
            gen = self._waiting[0]
            if gen.cancelled or gen._expired(now):
                self._waiting.popleft()
                self._abandon(gen)
                continue
            too_many_tokens = (
                admitted and prefill_tokens + len(gen.prompt_ids) > self.max_prefill_tokens
            )
            if running + gen.n > self.max_batch_size or too_many_tokens:
                break
            self._waiting.popleft()
            admitted.append(gen)
            running += gen.n
            prefill_tokens += len(gen.prompt_ids)
            self.metrics.queue_time.observe(time.perf_counter() - gen.submitted_at)
        self.metrics.queue_size.set(len(self._waiting))
        return admitted

    def _abandon(self, gen: Generation) -> None:
        if gen.cancelled:
            self.metrics.aborted.labels("cancelled").inc()
            gen._failed = True  # nobody is listening: no event to send
        else:
            self._fail(gen, "deadline", "deadline exceeded during generation")

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        for key, batch in list(self._batches.items()):
            keep = []
            for i, seq in enumerate(batch.rows):
                if seq.gen.cancelled or seq.gen._expired(now):
                    if not seq.gen._failed:
                        self._abandon(seq.gen)
                else:
                    keep.append(i)
            if len(keep) < len(batch.rows):
                self._shrink(key, keep)

    def _shrink(self, key: int, keep: list[int]) -> None:
        batch = self._batches[key]
        if not keep:
            with self._cond:
                del self._batches[key]  # drops the last reference to a retired policy
            return
        batch.select(keep)

    def _prefill(self, gens: list[Generation]) -> None:
        policy = gens[0].policy
        seqs = [self._new_seq(g, i) for g in gens for i in range(g.n)]
        start = time.perf_counter()
        new, logits = KVBatch.prefill(
            policy.model,
            [g.prompt_ids for g in gens],
            [g.n for g in gens],
            seqs,
            policy.tokenizer.pad_token_id,
        )
        self.metrics.forward.labels("prefill").observe(time.perf_counter() - start)
        tokens, logprobs = select_tokens(logits, [s.row for s in seqs])
        with self._cond:
            running = self._batches.get(id(policy))
            if running is None:
                self._batches[id(policy)] = new
            else:
                running.join(new)
        self._advance(id(policy), seqs, tokens, logprobs)

    def _new_seq(self, gen: Generation, index: int) -> _Seq:
        seed = gen.params.seed if gen.params.seed is not None else secrets.randbits(63)
        generator = None
        if gen.params.do_sample:
            generator = torch.Generator(device=gen.policy.device)
            generator.manual_seed(sample_seed(seed, index))
        row = RowState(gen.params, generator, list(gen.prompt_ids))
        return _Seq(gen, index, row, Detokenizer(gen.policy.tokenizer, gen.prompt_ids[-4:]))

    def _decode(self, key: int) -> None:
        batch = self._batches[key]
        seqs = batch.rows
        start = time.perf_counter()
        logits = batch.decode([s.token_ids[-1] for s in seqs])
        tokens, logprobs = select_tokens(logits, [s.row for s in seqs])
        self.metrics.forward.labels("decode").observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(len(seqs))
        self._advance(key, seqs, tokens, logprobs)

    def _advance(
        self, key: int, seqs: list[_Seq], tokens: list[int], logprobs: list[float]
    ) -> None:
        """Appends one token to each of ``seqs``, emits events, retires finished sequences."""
        now = time.perf_counter()
        finished: set[int] = set()
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            gen = seq.gen
            if gen.first_token_at is None:
                gen.first_token_at = now
                self.metrics.ttft.observe(now - gen.submitted_at)
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            seq.row.context.append(token)
            reason = None
            delta = ""
            if token in gen.policy.eos_token_ids:
                reason = FinishReason.EOS_TOKEN
            elif gen.incremental_text:
                delta = seq.detok.push(token)
                before = len(seq.text)
                seq.text += delta
                reason = self._stop_hit(seq, delta)
                # The text is cut right after a stop string; the token's text ends there too.
                delta = seq.text[before:]
            if reason is None and len(seq.token_ids) >= gen.params.max_new_tokens:
                reason = FinishReason.LENGTH
            if (
                gen.incremental_text
                and reason is not None
                and reason is not FinishReason.STOP_SEQUENCE
            ):
                # Bytes held back for a character the sample never completed go out with the
                # last token, so the streamed texts always add up to the final text.
                tail = seq.detok.flush()
                delta += tail
                seq.text += tail
            seq.texts.append(delta)
            done = None
            if reason is not None:
                finished.add(id(seq))
                done = self._finish(seq, reason, now)
            if gen.stream or done is not None:
                self._outbox.setdefault(gen, []).append(
                    TokenEvent(seq.index, token, delta, logprob, done)
                )
        self.metrics.generated.inc(len(seqs))
        if finished:
            batch = self._batches[key]
            self._shrink(key, [i for i, s in enumerate(batch.rows) if id(s) not in finished])

    @staticmethod
    def _stop_hit(seq: _Seq, delta: str) -> FinishReason | None:
        for stop in seq.gen.params.stop:
            # Only the tail can hold a stop string that this token completed.
            at = seq.text.find(stop, max(0, len(seq.text) - len(delta) - len(stop) + 1))
            if at >= 0:
                # As in TGI, the text ends with the stop sequence; anything after it is cut.
                seq.text = seq.text[: at + len(stop)]
                return FinishReason.STOP_SEQUENCE
        return None

    def _finish(self, seq: _Seq, reason: FinishReason, now: float) -> SampleDone:
        tokenizer = seq.gen.policy.tokenizer
        text = seq.text
        if not seq.gen.incremental_text:
            # The EOS token is in token_ids (training sees the sample ended) but never in the text.
            ids = seq.token_ids[:-1] if reason is FinishReason.EOS_TOKEN else seq.token_ids
            text = str(
                tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            )
        count = len(seq.token_ids)
        self.metrics.finished.labels(reason.value).inc()
        self.metrics.generation_tokens.observe(count)
        if count > 1 and seq.gen.first_token_at is not None:
            self.metrics.tpot.observe((now - seq.gen.first_token_at) / (count - 1))
        return SampleDone(
            seq.index, tuple(seq.token_ids), tuple(seq.logprobs), tuple(seq.texts), text, reason
        )

    def _fail(self, gen: Generation, reason: str, message: str) -> None:
        if gen._failed:
            return
        gen._failed = True
        self.metrics.aborted.labels(reason).inc()
        self._outbox.setdefault(gen, []).append(GenerationFailed(reason, message))

    def _flush(self) -> None:
        """One hand-over per request per step keeps the event loop's wake-ups few."""
        outbox, self._outbox = self._outbox, {}
        for gen, events in outbox.items():
            gen._deliver(events)


def _by_policy(gens: list[Generation]) -> list[list[Generation]]:
    groups: dict[int, list[Generation]] = {}
    for gen in gens:
        groups.setdefault(id(gen.policy), []).append(gen)
    return list(groups.values())
