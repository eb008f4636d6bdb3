"""Batched reward scoring: concurrent requests share forward passes.

One worker thread runs the reward model. Whatever requests arrived while it was busy are
scored together in the next pass (up to ``max_batch_pairs`` (prompt, response) pairs), so
batches grow with load without anyone waiting on a timer. A request keeps the
``LoadedRewardModel`` it resolved when it started; a pass only mixes requests of one version.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from transformers import PreTrainedTokenizerBase

from rlhf.encoding import EncodingSpec, join_pairs
from rlhf.models import RewardModel

log = logging.getLogger(__name__)

PAIR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
REWARD_BUCKETS = (-10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 10)


class QueueFull(Exception):
    pass


class ScorerStopped(Exception):
    pass


@dataclass(frozen=True, eq=False)
class LoadedRewardModel:
    """A reward-model version ready to score. Requests hold the one they started with."""

    model: RewardModel
    tokenizer: PreTrainedTokenizerBase
    version: str
    encoding: EncodingSpec  # how its training encoded examples (its manifest's)

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device


@dataclass(eq=False)
class _Job:
    rm: LoadedRewardModel
    prompt_ids: list[int]
    response_ids: list[list[int]]
    future: asyncio.Future[list[float]]
    loop: asyncio.AbstractEventLoop


class ScorerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue_size = Gauge(
            "rlhf_reward_queue_size", "Requests waiting to be scored", registry=registry
        )
        self.batch_size = Histogram(
            "rlhf_reward_batch_size",
            "Pairs per forward pass",
            buckets=PAIR_BUCKETS,
            registry=registry,
        )
        self.forward = Histogram(
            "rlhf_reward_forward_duration_seconds",
            "Reward model forward pass duration",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.scored = Counter("rlhf_reward_scored", "Responses scored", registry=registry)
        self.rewards = Histogram(
            "rlhf_reward_value",
            "Normalised rewards returned",
            buckets=REWARD_BUCKETS,
            registry=registry,
        )
        self.sequence_tokens = Histogram(
            "rlhf_reward_sequence_tokens",
            "Prompt + response tokens per scored pair",
            buckets=(8, 16, 32, 64, 128, 256, 512, 1024, 2048),
            registry=registry,
        )


class BatchScorer:
    def __init__(
        self, registry: CollectorRegistry, *, max_batch_pairs: int = 64, max_queue: int = 256
    ) -> None:
        self.max_batch_pairs = max_batch_pairs
        self.max_queue = max_queue
        self.metrics = ScorerMetrics(registry)
        self._cond = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="reward-scorer", daemon=True)
        self._thread.start()

    async def score(
        self,
        rm: LoadedRewardModel,
        prompt_ids: Sequence[int],
        response_ids: Sequence[Sequence[int]],
    ) -> list[float]:
        """Normalised rewards, one per response; raises QueueFull / ScorerStopped."""
        if not 1 <= len(response_ids) <= self.max_batch_pairs:
            raise ValueError(
                f"1..{self.max_batch_pairs} responses per call, got {len(response_ids)}"
            )
        loop = asyncio.get_running_loop()
        job = _Job(
            rm, list(prompt_ids), [list(r) for r in response_ids], loop.create_future(), loop
        )
        with self._cond:
            if self._stopping:
                raise ScorerStopped("the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are already waiting (max_queue)")
            self._jobs.append(job)
            self.metrics.queue_size.set(len(self._jobs))
            self._cond.notify()
        return await job.future

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)
        with self._cond:
            left = list(self._jobs)
            self._jobs.clear()
        for job in left:
            _resolve(job, error=ScorerStopped("the server is shutting down"))

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._jobs.popleft()
            taken, pairs = [first], len(first.response_ids)
            # FIFO, same version only, so nobody is overtaken indefinitely.
            while (
                self._jobs
                and self._jobs[0].rm is first.rm
                and pairs + len(self._jobs[0].response_ids) <= self.max_batch_pairs
            ):
                job = self._jobs.popleft()
                taken.append(job)
                pairs += len(job.response_ids)
            self.metrics.queue_size.set(len(self._jobs))
            return taken

    def _run(self) -> None:
        with torch.inference_mode():
            while (jobs := self._take()) is not None:
                live = [j for j in jobs if not j.future.cancelled()]
                if not live:
                    continue
                try:
                    rewards = self._forward(live)
                except Exception as exc:  # one bad batch must not stop the scorer
                    log.exception("reward forward pass failed")
                    for job in live:
                        _resolve(job, error=exc)
                    continue
                at = 0
                for job in live:
                    n = len(job.response_ids)
                    _resolve(job, value=rewards[at : at + n])
                    at += n

    def _forward(self, jobs: list[_Job]) -> list[float]:
        rm = jobs[0].rm
        prompts = [job.prompt_ids for job in jobs for _ in job.response_ids]
        responses = [r for job in jobs for r in job.response_ids]
        batch = join_pairs(prompts, responses, rm.tokenizer.pad_token_id).to(rm.device)
        start = time.perf_counter()
        rewards = rm.model(batch.input_ids, batch.attention_mask).float().cpu().tolist()
        self.metrics.forward.observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(len(responses))
        self.metrics.scored.inc(len(responses))
        for reward, length in zip(rewards, batch.attention_mask.sum(dim=1).tolist(), strict=True):
            self.metrics.rewards.observe(reward)
            self.metrics.sequence_tokens.observe(length)
        return rewards


def _resolve(
    job: _Job, value: list[float] | None = None, error: BaseException | None = None
) -> None:
    def settle() -> None:
        if job.future.done():  # the caller gave up (cancelled or deadline)
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(value or [])

    # A closed loop means the server is gone and nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(settle)
