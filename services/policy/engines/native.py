"""The native engine: continuous batching of transformers models over per-slot KV memory.

One worker thread owns the forward passes. Each iteration it admits waiting requests (FIFO,
as long as their policy has a free slot per sample), drops cancelled and expired sequences,
then runs one packed forward pass per resident policy: the last token of every decoding
sequence plus as many prompt tokens as the step's token budget leaves (``max_step_tokens``;
long prompts are prefilled in chunks over several steps, while the others keep decoding).
KV memory is preallocated per slot and written in place (``kvbatch.py``); token selection is
vectorised over per-slot parameters (``sampling.py``).

A request's ``n`` samples share one prefill of the prompt, and a prompt that starts like one
prefilled before reuses that prefix's keys and values (``prefix.py``; all but its last token
cached: that token joins the step's decode rows). Each request keeps the
``LoadedPolicy`` it started with: sequences are batched per policy, so during a model swap
both versions decode side by side, and a version's KV memory is freed when it is unloaded.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.models import load_policy
from services.policy.engine import (
    EngineMetrics,
    EngineStats,
    EngineStopped,
    FinishReason,
    Generation,
    GenerationFailed,
    Policy,
    QueueFull,
    SampleText,
    TokenEvent,
    deliver_all,
)
from services.policy.kvbatch import Chunk, SlotCache
from services.policy.prefix import PrefixCache
from services.policy.sampling import Sampler, SamplingParams, sample_seed

log = logging.getLogger(__name__)

# A step's hand-over: each request's new events, and the requests it gave a slot.
Deliver = Callable[[dict[Generation, list[TokenEvent | GenerationFailed]], list[Generation]], None]


@dataclass(frozen=True, eq=False)
class LoadedPolicy:
    """A model version in this process. Requests hold the one they started with."""

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

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


@dataclass(eq=False)
class _Seq:
    out: SampleText
    slot: int

    @property
    def gen(self) -> Generation:
        return self.out.gen


@dataclass(eq=False)
class _Prefill:
    """A request whose prompt is (partly) still to run; ``seqs[0]``'s slot receives it."""

    gen: Generation
    seqs: list[_Seq]
    done: int = 0  # prompt tokens already in the cache


@dataclass(eq=False)
class _Batch:
    """Everything one policy's sequences share: its KV slots and sampling state."""

    cache: SlotCache
    sampler: Sampler
    prefix: PrefixCache | None = None
    decoding: list[_Seq] = field(default_factory=list)
    prefilling: collections.deque[_Prefill] = field(default_factory=collections.deque)
    retired: bool = False

    def empty(self) -> bool:
        return not self.decoding and not self.prefilling

    def sequences(self) -> list[_Seq]:
        return self.decoding + [s for p in self.prefilling for s in p.seqs]

    def running(self) -> int:
        return len(self.decoding) + sum(len(p.seqs) for p in self.prefilling)


class NativeEngine:
    """``GenerationEngine`` over transformers models in this process (see module doc)."""

    kind = "native"

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_step_tokens: int = 2048,
        max_seq_len: int = 2048,
        device: str = "auto",
        dtype: str = "auto",
        prefix_cache_tokens: int = 0,
        deliver: Deliver | None = None,
    ) -> None:
        if max_step_tokens <= max_batch_size:
            raise ValueError("max_step_tokens must exceed max_batch_size (room for prefill)")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_step_tokens = max_step_tokens
        self.max_seq_len = max_seq_len
        self.prefix_cache_tokens = prefix_cache_tokens
        self._device, self._dtype = device, dtype
        self.metrics = EngineMetrics(registry)
        self._cond = threading.Condition()
        self._waiting: collections.deque[Generation] = collections.deque()
        self._batches: weakref.WeakKeyDictionary[LoadedPolicy, _Batch] = weakref.WeakKeyDictionary()
        self._outbox: dict[Generation, list[TokenEvent | GenerationFailed]] = {}
        # Each step's events, to the requests' event loops, and the requests the step gave a
        # slot (worker.py sends both up in one message).
        self._deliver: Deliver = deliver or (lambda outbox, _admitted: deliver_all(outbox))
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="policy-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ versions

    def load(self, path: Path, version: str) -> LoadedPolicy:
        device, dtype = placement(self._device, self._dtype)
        model, tokenizer = load_policy(path, device, dtype)
        log.info("loaded policy %s from %s on %s (%s)", version, path, device, model.dtype)
        return LoadedPolicy.of(model, tokenizer, version)

    def warm_up(self, policy: LoadedPolicy) -> None:
        """Allocates the version's KV slots (failing here, not under traffic, if memory is
        short) and runs a real packed forward pass through them; non-finite logits reject it."""
        with torch.inference_mode():
            ids = torch.tensor([[policy.tokenizer.bos_token_id or 0]], device=policy.device)
            logits = policy.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            if not torch.isfinite(logits).all():
                raise ValueError(f"policy {policy.version}: warm-up gave non-finite logits")
            with self._cond:
                batch = self._batch(policy)
            # Nothing routes to the version before warm-up ends: its slots are ours alone.
            cache = batch.cache
            slot = cache.allocate()
            try:
                out = cache.forward([], [], [Chunk(slot, 0, [int(ids[0, 0]), 0])])
                out = cache.forward([slot], [0], [])
            finally:
                cache.release(slot)
        if not torch.isfinite(out).all():
            raise ValueError(f"policy {policy.version}: warm-up gave non-finite logits")

    def unload(self, policy: LoadedPolicy) -> None:
        with self._cond:
            batch = self._batches.get(policy)
            if batch is not None:
                batch.retired = True
                if batch.empty():
                    del self._batches[policy]

    def _batch(self, policy: LoadedPolicy) -> _Batch:
        """The policy's batch state, made on first use (called with the lock held)."""
        batch = self._batches.get(policy)
        if batch is None:
            capacity = min(self.max_seq_len, policy.max_context or self.max_seq_len)
            cache = SlotCache(policy.model, self.max_batch_size, capacity)
            vocab = policy.model.get_output_embeddings().weight.shape[0]
            prefix = (
                PrefixCache(cache, self.prefix_cache_tokens) if self.prefix_cache_tokens else None
            )
            batch = _Batch(
                cache, Sampler(self.max_batch_size, vocab, capacity, cache.device), prefix
            )
            self._batches[policy] = batch
            log.info(
                "policy %s: %d KV slots x %d tokens (%.1f MiB)",
                policy.version, cache.slots, capacity, cache.nbytes / 2**20,
            )  # fmt: skip
        return batch

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
        gen = new_generation(
            self.max_batch_size, self.max_seq_len, policy, prompt_ids, params, n, deadline,
            stream, token_texts,
        )  # fmt: skip
        self.enqueue(gen)
        return gen

    def enqueue(self, gen: Generation) -> None:
        """Queues a checked request (``submit`` without making the Generation)."""
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue)")
            self._waiting.append(gen)
            self.metrics.queue_size.set(len(self._waiting))
            self._cond.notify_all()
        self.metrics.prompt_tokens.observe(len(gen.prompt_ids))

    def stats(self) -> EngineStats:
        with self._cond:
            batches = list(self._batches.items())
            return EngineStats(
                kind=self.kind,
                waiting=len(self._waiting),
                running=sum(b.running() for _, b in batches),
                versions=tuple(sorted(p.version for p, b in batches if not b.retired)),
                kv_bytes=sum(
                    b.cache.nbytes + (b.prefix.nbytes if b.prefix else 0) for _, b in batches
                ),
                kv_tokens_used=sum(sum(b.cache.lengths) for _, b in batches),
                kv_tokens_total=sum(b.cache.slots * b.cache.capacity for _, b in batches),
            )

    def running_sequences(self) -> int:
        return self.stats().running

    def wait_queued(self, count: int, timeout_s: float) -> bool:
        """Blocks until at least ``count`` requests wait for a batch slot (True) or the timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._waiting) >= count, timeout_s)

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(self._idle, timeout_s)

    def _idle(self) -> bool:
        return not self._waiting and all(b.empty() for b in self._batches.values())

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        with self._cond:
            leftovers = list(self._waiting) + [
                s.gen for b in self._batches.values() for s in b.sequences()
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
                    while not self._stopping and self._idle():
                        self._cond.wait()
                    if self._stopping:
                        return
                    admitted = self._admit()
                try:
                    self._drop_abandoned()
                    with self._cond:
                        batches = list(self._batches.items())
                    for policy, batch in batches:
                        self._step(policy, batch)
                except Exception:  # a bug must not take the whole server down with it
                    log.exception("engine step failed; failing the requests of this step")
                    with self._cond:
                        gens = [s.gen for b in self._batches.values() for s in b.sequences()]
                        for batch in self._batches.values():
                            for seq in batch.sequences():
                                batch.cache.release(seq.slot)
                            batch.decoding.clear()
                            batch.prefilling.clear()
                    for gen in dict.fromkeys(gens + admitted):
                        self._fail(gen, "internal", "generation failed inside the engine")
                self._flush(admitted)
                with self._cond:
                    for policy, batch in list(self._batches.items()):
                        if batch.retired and batch.empty():
                            del self._batches[policy]  # unloaded, its last sequence gone
                    running = sum(b.running() for b in self._batches.values())
                    if self._idle():
                        self._cond.notify_all()  # wakes wait_idle callers
                    used = sum(sum(b.cache.lengths) for b in self._batches.values())
                    total = sum(b.cache.slots * b.cache.capacity for b in self._batches.values())
                self.metrics.running.set(running)
                self.metrics.kv_used.set(used / total if total else 0.0)

    def _admit(self) -> list[Generation]:
        """Gives waiting requests slots, FIFO, while their policy has room (lock held)."""
        admitted: list[Generation] = []
        now = time.monotonic()
        while self._waiting:
            gen = self._waiting[0]
            if gen.cancelled or gen.expired(now):
                self._waiting.popleft()
                self._abandon(gen)
                continue
            try:
                batch = self._batch(gen.policy)
            except (TypeError, RuntimeError) as exc:  # unsupported model, out of memory
                self._waiting.popleft()
                log.error("cannot serve policy %s: %s", gen.policy.version, exc)
                self._fail(gen, "internal", f"the engine cannot run this model: {exc}")
                continue
            if batch.cache.free_slots < gen.n:
                break
            self._waiting.popleft()
            seqs = [self._new_seq(batch, gen, i) for i in range(gen.n)]
            cached = batch.prefix.fill(seqs[0].slot, gen.prompt_ids) if batch.prefix else 0
            self.metrics.prefix_hit_tokens.inc(cached)
            batch.prefilling.append(_Prefill(gen, seqs, cached))
            admitted.append(gen)
            self.metrics.queue_time.observe(time.perf_counter() - gen.submitted_at)
        self.metrics.queue_size.set(len(self._waiting))
        return admitted

    def _new_seq(self, batch: _Batch, gen: Generation, index: int) -> _Seq:
        slot = batch.cache.allocate()
        seed = gen.params.seed if gen.params.seed is not None else secrets.randbits(63)
        batch.sampler.start(slot, gen.params, sample_seed(seed, index), gen.prompt_ids)
        return _Seq(SampleText.of(gen, index), slot)

    def _abandon(self, gen: Generation) -> None:
        if gen.cancelled:
            self.metrics.aborted.labels("cancelled").inc()
            gen.failed = True  # nobody is listening: no event to send
        else:
            self._fail(gen, "deadline", "deadline exceeded during generation")

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        with self._cond:
            for batch in self._batches.values():
                gens = {s.out.gen for s in batch.decoding}
                gens.update(p.gen for p in batch.prefilling)
                gone = {g for g in gens if g.cancelled or g.expired(now)}
                if not gone:
                    continue
                for gen in gone:
                    if not gen.failed:
                        self._abandon(gen)
                for seq in batch.sequences():
                    if seq.gen in gone:
                        batch.cache.release(seq.slot)
                batch.decoding = [s for s in batch.decoding if s.gen not in gone]
                batch.prefilling = collections.deque(
                    p for p in batch.prefilling if p.gen not in gone
                )

    def _step(self, policy: LoadedPolicy, batch: _Batch) -> None:
        """One packed forward pass of this policy's decoding sequences and prompt chunks."""
        budget = self.max_step_tokens - len(batch.decoding)
        chunks: list[Chunk] = []
        completed: list[_Prefill] = []
        # Decode rows: (slot, token, who); a prompt whose prefix came cached, all but its last
        # token, runs that token as a decode row (no prompt pass of its own).
        rows_in: list[tuple[int, int, _Seq | _Prefill]] = [
            (s.slot, s.out.token_ids[-1], s) for s in batch.decoding
        ]
        for pre in batch.prefilling:
            if budget <= 0:
                break
            prompt = pre.gen.prompt_ids
            take = min(budget, len(prompt) - pre.done)
            if pre.done and pre.done == len(prompt) - 1:
                rows_in.append((pre.seqs[0].slot, prompt[-1], pre))
            else:
                chunks.append(Chunk(pre.seqs[0].slot, pre.done, prompt[pre.done : pre.done + take]))
            pre.done += take
            budget -= take
            if pre.done == len(prompt):
                completed.append(pre)
        if not rows_in and not chunks:
            return
        rows_in.sort(key=lambda r: r[0])
        start = time.perf_counter()
        logits = batch.cache.forward([r[0] for r in rows_in], [r[1] for r in rows_in], chunks)
        # Rows whose next token is chosen now: the decoding ones, then every sample of each
        # prompt that finished prefilling (its last token's logits, shared by its n samples).
        rows: list[int] = []
        seqs: list[_Seq] = []
        for i, (_, _, who) in enumerate(rows_in):
            if isinstance(who, _Seq):
                rows.append(i)
                seqs.append(who)
            else:
                rows += [i] * len(who.seqs)
                seqs += who.seqs
        finished = {p.seqs[0].slot: p for p in completed}
        for i, chunk in enumerate(chunks):
            if chunk.slot in finished:
                rows += [len(rows_in) + i] * len(finished[chunk.slot].seqs)
                seqs += finished[chunk.slot].seqs
        for ready in completed:
            length = len(ready.gen.prompt_ids)
            if batch.prefix is not None:
                batch.prefix.store(ready.seqs[0].slot, ready.gen.prompt_ids)
            batch.cache.copy_prefix(ready.seqs[0].slot, [s.slot for s in ready.seqs[1:]], length)
            batch.prefilling.remove(ready)
        picked = logits if rows == list(range(logits.shape[0])) else logits[rows]
        tokens, logprobs = batch.sampler.select(picked, [s.slot for s in seqs])
        decoding = len(rows_in)
        phase = "decode" if not chunks else "prefill" if not decoding else "mixed"
        self.metrics.forward.labels(phase).observe(time.perf_counter() - start)
        self.metrics.step_tokens.observe(decoding + sum(len(c.tokens) for c in chunks))
        if decoding:
            self.metrics.batch_size.observe(decoding)
        batch.decoding = self._advance(policy, batch, seqs, tokens, logprobs)

    def _advance(
        self,
        policy: LoadedPolicy,
        batch: _Batch,
        seqs: list[_Seq],
        tokens: list[int],
        logprobs: list[float],
    ) -> list[_Seq]:
        """Appends one token to each of ``seqs``, emits events; returns those still going."""
        now = time.perf_counter()
        going = []
        eos = policy.eos_token_ids
        first_token = self.metrics.first_token
        lengths, capacity = batch.cache.lengths, batch.cache.capacity
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            out = seq.out
            gen = out.gen
            first_token(gen, now)
            delta, reason = out.push(token, logprob, token in eos)
            done = None
            if reason is None and lengths[seq.slot] >= capacity:
                reason = FinishReason.LENGTH  # unreachable: submit checks the length
            if reason is not None:
                done = out.done(reason)
                self.metrics.sample_done(gen, done, now)
                batch.cache.release(seq.slot)
            else:
                going.append(seq)
            if gen.stream or done is not None:
                self._outbox.setdefault(gen, []).append(
                    TokenEvent(out.index, token, delta, logprob, done)
                )
        self.metrics.generated.inc(len(seqs))
        if batch.retired and not going and not batch.prefilling:
            with self._cond:
                self._batches.pop(policy, None)  # the version's KV memory goes with it
        return going

    def _fail(self, gen: Generation, reason: str, message: str) -> None:
        if gen.failed:
            return
        gen.failed = True
        self.metrics.aborted.labels(reason).inc()
        self._outbox.setdefault(gen, []).append(GenerationFailed(reason, message))

    def _flush(self, admitted: list[Generation] | None = None) -> None:
        """One hand-over per request per step keeps the event loop's wake-ups few."""
        outbox, self._outbox = self._outbox, {}
        if outbox or admitted:
            self._deliver(outbox, admitted or [])


def new_generation(
    max_batch_size: int,
    max_seq_len: int,
    policy: Policy,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    n: int,
    deadline: float | None,
    stream: bool,
    token_texts: bool,
) -> Generation:
    """A request of the calling event loop, once checked; ValueError if no engine can run it."""
    if not 1 <= n <= max_batch_size:
        raise ValueError(f"n must be in 1..{max_batch_size}, got {n}")
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    limit = min(max_seq_len, policy.max_context or max_seq_len)
    if len(prompt_ids) + params.max_new_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
            f"exceeds the engine's {limit} tokens per sequence"
        )
    return Generation(
        policy, prompt_ids, params, n, deadline, asyncio.get_running_loop(),
        stream=stream, token_texts=token_texts,
    )  # fmt: skip


def placement(device: str, dtype: str) -> tuple[torch.device, torch.dtype | None]:
    """(device, dtype or None for the loader's default) from ``--model.device/dtype`` values."""
    where = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return where, dtypes.get(dtype)
