"""Which task a labeler gets next: the pool's open tasks in the configured order, else a task
generated on demand.

``recent`` hands out the newest served task first. ``uncertainty`` prefers prompts where the
current reward model is least sure: each task's K responses are scored by the reward server
(``RewardService.Score``, the normalised rewards) and the task whose top two rewards are
closest comes first, since a label there tells the RM the most. Scores are kept per task and
reward-model version; one request scores at most ``score_window`` unscored tasks (newest
first), so the work per request is bounded whatever the queue holds. When the reward server
fails, the order falls back to ``recent`` and says why.

When no task is open, a recent served prompt (or conversation) that never had one (traffic
asks for n = 1) is sent to the policy server with n = K, under the original user id so the split stays the
user's; the policy server publishes the K samples to ``rlhf.prompts`` as for any caller, so
the gateway resolves their generation ids like any others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc

from rlhf.pii import Redactor
from rlhf.v1 import inference_pb2, inference_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.feedback.workbench.config import WorkbenchConfig
from services.feedback.workbench.tasks import (
    Response,
    Task,
    TaskPool,
    Turns,
    distinct_responses,
)

log = logging.getLogger(__name__)

# Scoring calls in flight at once for one request.
SCORE_CONCURRENCY = 8
# Generations tried for a prompt on demand (one may yield too few distinct, non-empty texts).
GENERATE_ATTEMPTS = 2


class Upstream:
    """gRPC clients of the policy and reward servers, opened on the serving loop."""

    def __init__(self, config: WorkbenchConfig) -> None:
        self._config = config
        self._ca = Path(config.ca_file).read_bytes() if config.ca_file else None
        self._metadata = (
            (("authorization", f"Bearer {config.api_key}"),) if config.api_key else None
        )
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            if self._ca is not None:
                creds = grpc.ssl_channel_credentials(root_certificates=self._ca)
                self._channels[target] = grpc.aio.secure_channel(target, creds)
            else:
                self._channels[target] = grpc.aio.insecure_channel(target)
        return self._channels[target]

    async def generate(
        self, prompt: str, messages: Turns, user_id: str
    ) -> inference_pb2.GenerateResponse:
        config = self._config
        stub = inference_pb2_grpc.InferenceServiceStub(self._channel(config.policy_target))
        request = inference_pb2.GenerateRequest(
            prompt=prompt,
            messages=_chat(messages),
            n=config.k,
            user_id=user_id,
            parameters=inference_pb2.GenerationParameters(
                do_sample=True,
                temperature=config.temperature,
                max_new_tokens=config.max_new_tokens,
            ),
        )
        reply: inference_pb2.GenerateResponse = await stub.Generate(
            request, metadata=self._metadata, timeout=config.call_timeout_s
        )
        return reply

    async def score(self, task: Task) -> reward_pb2.ScoreResponse:
        stub = reward_pb2_grpc.RewardServiceStub(self._channel(self._config.reward_target))
        request = reward_pb2.ScoreRequest(
            prompt=task.prompt,
            messages=_chat(task.messages),
            responses=[r.text for r in task.responses],
        )
        reply: reward_pb2.ScoreResponse = await stub.Score(
            request,
            metadata=self._metadata,
            timeout=self._config.call_timeout_s,
        )
        return reply

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _chat(messages: Turns) -> list[inference_pb2.ChatMessage]:
    return [inference_pb2.ChatMessage(role=role, content=content) for role, content in messages]


def _failure(what: str, exc: grpc.aio.AioRpcError) -> str:
    return f"{what} failed ({exc.code().name}: {exc.details()})"


class LabelingQueue:
    def __init__(
        self,
        config: WorkbenchConfig,
        pool: TaskPool,
        upstream: Upstream,
        redactor: Redactor,
    ) -> None:
        self._config = config
        self._pool = pool
        self._upstream = upstream
        self._redactor = redactor
        self._rm_version = ""

    async def ordered(self, labeler: str) -> tuple[list[Task], str]:
        """The tasks open for ``labeler`` in the order they are handed out, and the order used
        (with the reason when it fell back to ``recent``)."""
        tasks = self._pool.candidates(labeler)  # newest first
        if self._config.order != "uncertainty" or not tasks:
            return tasks, "recent"
        try:
            await self._score(tasks)
        except grpc.aio.AioRpcError as exc:
            log.warning("workbench: %s", _failure("reward server", exc))
            return tasks, f"recent ({_failure('the reward server', exc)})"
        # Scored tasks by gap (newest first among equals), then the unscored, newest first.
        ranked = sorted(
            tasks,
            key=lambda t: (t.gap is None, t.gap if t.gap is not None else 0.0, -t.created_at_ms),
        )
        return ranked, "uncertainty"

    async def _score(self, tasks: list[Task]) -> None:
        """Scores the newest tasks not scored by the current reward model. A task the reward
        server refuses (INVALID_ARGUMENT: a conversation for a model without a chat template,
        a text over its limits) stays unscored, last in the order; any other failure means the
        server itself is in trouble and is raised."""
        stale = [
            t
            for t in tasks
            if t.reward_version != self._rm_version or (t.rewards is None and not t.unscorable)
        ]
        slots = asyncio.Semaphore(SCORE_CONCURRENCY)

        async def one(task: Task) -> None:
            async with slots:
                try:
                    reply = await self._upstream.score(task)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        raise
                    task.rewards, task.reward_version = None, self._rm_version
                    task.unscorable = str(exc.details())
                    return
            task.rewards = tuple(reply.rewards)
            task.reward_version = reply.model_version
            task.unscorable = ""
            self._rm_version = reply.model_version

        await asyncio.gather(*(one(t) for t in stale[: self._config.score_window]))

    async def next(self, labeler: str) -> tuple[Task | None, str]:
        """The task to show ``labeler`` (leased to them) and a note on where it came from."""
        held = self._pool.current(labeler)
        if held is not None:
            return held, "resumed"
        tasks, order = await self.ordered(labeler)
        for task in tasks:
            if self._pool.lease(task.task_id, labeler):
                return task, order
        if not self._config.policy_target:
            return None, "no task is waiting"
        taken = self._pool.take_prompt()
        if taken is None:
            return None, "no task is waiting and no served prompt is left to generate for"
        for _ in range(GENERATE_ATTEMPTS):
            try:
                generated = await self._generate(*taken)
            except grpc.aio.AioRpcError as exc:
                log.warning("workbench: %s", _failure("policy server", exc))
                return None, _failure("generating a task with the policy server", exc)
            if generated is not None and self._pool.lease(generated.task_id, labeler):
                return generated, "generated"
        return None, "the policy server gave too few distinct responses; ask again"

    async def _generate(self, prompt: str, messages: Turns, user_id: str) -> Task | None:
        reply = await self._upstream.generate(prompt, messages, user_id)
        # Shown as the gateway will store them: with PII redacted.
        samples = [(s.generation_id, self._redactor.redact(s.text)[0]) for s in reply.samples]
        responses: tuple[Response, ...] = distinct_responses(samples, reply.model_version)
        if len(responses) < self._config.min_k:
            return None
        task = self._pool.add_task(
            prompt,
            user_id,
            responses,
            int(time.time() * 1000),
            source="generated",
            messages=messages,
        )
        return task
