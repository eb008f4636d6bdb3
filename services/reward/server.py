"""``rlhf serve reward``: the RewardService gRPC server (auth scope ``infer``).

``Score`` (and ``POST /v1/score`` over HTTP/JSON, ``http.py``) returns the normalised reward r(x, y) + bias of each response (the bias makes
labeler demonstrations average 0, PAPER.md) and the reward-model version that produced them.
A prompt or a ``messages`` conversation and the responses are encoded exactly as the reward
model's training encoded them: ``rlhf.encoding`` under the spec recorded in the version's
manifest (chat template, truncation of long prompts and responses, EOS). Request limits
(``limits.*``) bound the work per request before that truncation. Concurrent requests are
scored in shared forward passes (``scorer.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import grpc
import torch
from prometheus_client import CollectorRegistry

from rlhf import encoding
from rlhf.chat import EncodingError, Message, check_conversation, prompt_of
from rlhf.config import parse_config
from rlhf.http import HttpDoor, Style
from rlhf.models import load_reward_model
from rlhf.pool import ModelPool, NotServing
from rlhf.runtime import CallError, Scope, ServerRuntime
from rlhf.v1 import admin_pb2_grpc, events_pb2, reward_pb2, reward_pb2_grpc
from services.reward import http
from services.reward.config import LimitsConfig, RewardServerConfig
from services.reward.scorer import BatchScorer, LoadedRewardModel, QueueFull, ScorerStopped
from services.serving import ModelConfig, ServingModels, version_of

log = logging.getLogger(__name__)

REWARD = "rlhf.v1.RewardService"
SERVICES = {REWARD: Scope.INFER}
# Longest model version name accepted (version names are short; errors quote the name).
MAX_ID_CHARS = 256
# Texts longer than this are tokenised off the event loop so they cannot stall other calls.
INLINE_TOKENIZE_CHARS = 8192


def load(path: Path, config: ModelConfig) -> LoadedRewardModel:
    """Loads the reward model in ``path`` on the configured device and dtype (checksums are
    the pool's job, before this runs)."""
    device, dtype = config.placement()
    model, tokenizer = load_reward_model(path, device, dtype)
    version = version_of(path, config.version if config.path else "")
    spec = encoding.spec_for_model(path, tokenizer)
    log.info("loaded reward model %s from %s on %s (bias %.4f, encoding %s)",
             version, path, device, float(model.bias), spec)  # fmt: skip
    return LoadedRewardModel(model, tokenizer, version, spec)


def warm_up(rm: LoadedRewardModel) -> None:
    """A real forward pass before the version takes requests; fails on non-finite output."""
    device = rm.model.head.weight.device
    with torch.inference_mode():
        ids = torch.tensor([[rm.tokenizer.bos_token_id or 0]], device=device)
        out = rm.model(ids, torch.ones_like(ids))
    if not torch.isfinite(out).all():
        raise ValueError(f"reward model {rm.version}: warm-up gave a non-finite reward")


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(
        self, scorer: BatchScorer, pool: ModelPool[LoadedRewardModel], limits: LimitsConfig
    ) -> None:
        self._scorer = scorer
        self._pool = pool
        self._limits = limits

    def _encode(
        self, rm: LoadedRewardModel, request: reward_pb2.ScoreRequest
    ) -> tuple[list[int], list[list[int]]]:
        """Token ids as in training (the version's encoding); ValueError names the field over
        its limit or what the encoding refused."""
        tok, spec = rm.tokenizer, rm.encoding
        try:
            prompt = encoding.prompt_ids(
                tok, spec, prompt_of(request.prompt, request.messages), truncate=False
            )
        except EncodingError as exc:
            raise ValueError(f"model version {rm.version}: {exc}") from None
        if len(prompt) > self._limits.max_prompt_tokens:
            raise ValueError(
                f"prompt is {len(prompt)} tokens, over the limit of {self._limits.max_prompt_tokens}"
            )
        responses = []
        for i, text in enumerate(request.responses):
            ids = encoding.response_ids(tok, spec, text, truncate=False)
            if len(ids) > self._limits.max_response_tokens:
                raise ValueError(
                    f"responses[{i}] is {len(ids)} tokens, over the limit of {self._limits.max_response_tokens}"
                )
            responses.append(encoding.truncate_response(spec, ids))
        return encoding.truncate_prompt(tok, spec, prompt), responses

    async def score(self, request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
        """Scores ``request`` (both doors run this); raises CallError with the status."""
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if request.prompt and request.messages:
            raise CallError(invalid, "set either prompt or messages, not both")
        if request.messages:
            try:
                check_conversation([Message(m.role, m.content) for m in request.messages])
            except EncodingError as exc:
                raise CallError(invalid, str(exc)) from None
        elif not request.prompt:
            raise CallError(invalid, "prompt must not be empty (or send messages)")
        if not 1 <= len(request.responses) <= self._limits.max_responses:
            raise CallError(
                invalid,
                f"responses must hold 1..{self._limits.max_responses} entries, got {len(request.responses)}",
            )
        if len(request.model_version) > MAX_ID_CHARS:
            raise CallError(invalid, f"model_version is over {MAX_ID_CHARS} characters")
        try:
            version = request.model_version or self._pool.choose()
        except NotServing as exc:
            raise CallError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        lease = contextlib.ExitStack()
        try:
            rm = lease.enter_context(self._pool.lease(version))
        except KeyError:
            raise CallError(
                grpc.StatusCode.NOT_FOUND,
                f"model_version {version!r} is not served here "
                f"(resident: {', '.join(self._pool.resident()) or 'none'})",
            ) from None
        with lease:  # the version stays resident until this request is scored
            return await self._score(rm, request)

    async def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        try:
            return await self.score(request)
        except CallError as error:
            await context.abort(error.code, error.message)
            raise  # unreachable: abort raises

    async def _score(
        self, rm: LoadedRewardModel, request: reward_pb2.ScoreRequest
    ) -> reward_pb2.ScoreResponse:
        size = len(request.prompt) + sum(len(m.content) for m in request.messages)
        size += sum(len(r) for r in request.responses)
        try:
            if size <= INLINE_TOKENIZE_CHARS:
                prompt_ids, response_ids = self._encode(rm, request)
            else:
                prompt_ids, response_ids = await asyncio.to_thread(self._encode, rm, request)
        except ValueError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        try:
            rewards = await self._scorer.score(rm, prompt_ids, response_ids)
        except QueueFull as exc:
            raise CallError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {exc}") from None
        except ScorerStopped as exc:
            raise CallError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        return reward_pb2.ScoreResponse(rewards=rewards, model_version=rm.version)


class RewardServer:
    """The reward server's parts, wired explicitly: model, batch scorer, gRPC runtime."""

    def __init__(
        self,
        config: RewardServerConfig,
        registry: CollectorRegistry,
    ) -> None:
        if config.limits.max_responses > config.batch.max_batch_pairs:
            raise ValueError("limits.max_responses must not exceed batch.max_batch_pairs")
        self.config = config
        self.registry = registry
        self.runtime = ServerRuntime(config.runtime, registry, component="reward")
        self.models: ServingModels[LoadedRewardModel] = ServingModels(
            role=events_pb2.MODEL_ROLE_REWARD,
            path=config.model.path,
            version=config.model.version,
            registry_dir=config.model.registry,
            follow=config.follow,
            models_topic=config.streams.topics.models,
            load=lambda path: load(path, config.model),
            warm_up=warm_up,
            metrics=registry,
            report=lambda name, ok, detail: self.runtime.set_condition(REWARD, name, ok, detail),
        )
        self.pool = self.models.pool
        self.scorer: BatchScorer | None = None

    async def add_servicers(self, server: grpc.aio.Server) -> None:
        scorer = BatchScorer(
            self.registry,
            max_batch_pairs=self.config.batch.max_batch_pairs,
            max_queue=self.config.batch.max_queue,
        )
        self.scorer = scorer
        self.runtime.on_stop(lambda: asyncio.to_thread(scorer.stop))
        servicer = RewardServicer(scorer, self.pool, self.config.limits)
        reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
        http.add_routes(HttpDoor(self.runtime, style=Style.GOOGLE), servicer)
        admin = self.models.admin_servicer()
        if admin is not None:
            admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
        self.runtime.on_stop(lambda: asyncio.to_thread(self.models.stop))
        await asyncio.to_thread(self.models.start)

    @property
    def services(self) -> dict[str, Scope]:
        return self.models.services(SERVICES)

    async def serve(self) -> None:
        await self.runtime.serve(self.add_servicers, self.services)

    def start_in_thread(self, ready_timeout_s: float = 120.0) -> None:
        """Serves from a thread; returns once a model version takes requests."""
        self.runtime.start_in_thread(self.add_servicers, self.services)
        self.models.wait_ready(ready_timeout_s)

    def stop_in_thread(self) -> None:
        self.runtime.stop_in_thread()


def main(argv: list[str]) -> int:
    config = parse_config(
        RewardServerConfig,
        argv,
        prog="rlhf serve reward",
        description="Serve a reward model over gRPC (RewardService.Score) with batched scoring.",
        env_prefix="RLHF_REWARD_",
    )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.batch.torch_threads:
        torch.set_num_threads(config.batch.torch_threads)
    asyncio.run(RewardServer(config, CollectorRegistry()).serve())
    return 0
