"""``rlhf serve reward``: the RewardService gRPC server (auth scope ``infer``).

``Score`` returns the normalised reward r(x, y) + bias of each response (the bias makes
labeler demonstrations average 0, PAPER.md) and the reward-model version that produced them.
Prompts and responses are encoded exactly as in reward-model training
(``rlhf.models.prompt_tokens`` / ``response_tokens``: BOS + prompt, response + EOS), and
concurrent requests are scored in shared forward passes (``scorer.py``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import grpc
import torch
from prometheus_client import CollectorRegistry, Gauge

from rlhf import checkpoint
from rlhf.config import parse_config
from rlhf.models import load_reward_model
from rlhf.runtime import Scope, ServerRuntime
from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.reward.config import LimitsConfig, ModelConfig, RewardServerConfig
from services.reward.scorer import BatchScorer, LoadedRewardModel, QueueFull, ScorerStopped

log = logging.getLogger(__name__)

SERVICES = {"rlhf.v1.RewardService": Scope.INFER}
# Texts longer than this are tokenised off the event loop so they cannot stall other calls.
INLINE_TOKENIZE_CHARS = 8192
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(config: ModelConfig) -> LoadedRewardModel:
    """Loads the configured reward model (verifying a checkpoint's checksums) and warms it up."""
    path = Path(config.path) if config.path else checkpoint.latest(config.registry, "reward")
    if path is None:
        raise FileNotFoundError(f"no reward version in registry {config.registry}")
    version = config.version or path.name
    if (path / checkpoint.MANIFEST).is_file():
        version = config.version or checkpoint.verify(path).version
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu")
        if config.device == "auto"
        else config.device
    )
    model, tokenizer = load_reward_model(path, device, _DTYPES.get(config.dtype))
    with torch.inference_mode():
        ids = torch.tensor([[tokenizer.bos_token_id or 0]], device=device)
        model(ids, torch.ones_like(ids))  # fails fast on a broken checkpoint
    log.info(
        "loaded reward model %s from %s on %s (bias %.4f)", version, path, device, float(model.bias)
    )
    return LoadedRewardModel(model, tokenizer, version)


class ResidentRewardModels:
    """The versions in memory and the one new requests get (``rlhf_reward_model_info``)."""

    def __init__(self, serving: LoadedRewardModel, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self._versions = {serving.version: serving}
        self._serving = serving
        self._info = Gauge(
            "rlhf_reward_model_info",
            "1 for the reward-model version serving new requests, 0 for other resident versions",
            ["version"],
            registry=registry,
        )
        self._info.labels(serving.version).set(1)

    def serving(self) -> LoadedRewardModel:
        return self._serving

    def get(self, version: str) -> LoadedRewardModel | None:
        with self._lock:
            return self._versions.get(version)

    def versions(self) -> list[str]:
        with self._lock:
            return sorted(self._versions)


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(
        self, scorer: BatchScorer, models: ResidentRewardModels, limits: LimitsConfig
    ) -> None:
        self._scorer = scorer
        self._models = models
        self._limits = limits

    def _encode(
        self, rm: LoadedRewardModel, request: reward_pb2.ScoreRequest
    ) -> tuple[list[int], list[list[int]]]:
        """Token ids as in training; ValueError names the field over its limit."""
        tok = rm.tokenizer
        prompt = list(tok(request.prompt, add_special_tokens=True)["input_ids"])
        if len(prompt) > self._limits.max_prompt_tokens:
            raise ValueError(
                f"prompt is {len(prompt)} tokens, over the limit of {self._limits.max_prompt_tokens}"
            )
        responses = []
        for i, text in enumerate(request.responses):
            ids = [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
            if len(ids) > self._limits.max_response_tokens:
                raise ValueError(
                    f"responses[{i}] is {len(ids)} tokens, over the limit of {self._limits.max_response_tokens}"
                )
            responses.append(ids)
        return prompt, responses

    async def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if not request.prompt:
            await context.abort(invalid, "prompt must not be empty")
        if not 1 <= len(request.responses) <= self._limits.max_responses:
            await context.abort(
                invalid,
                f"responses must hold 1..{self._limits.max_responses} entries, got {len(request.responses)}",
            )
        rm = (
            self._models.get(request.model_version)
            if request.model_version
            else self._models.serving()
        )
        if rm is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model_version {request.model_version!r} is not served here "
                f"(resident: {', '.join(self._models.versions())})",
            )
            raise AssertionError("unreachable: abort raises")
        size = len(request.prompt) + sum(len(r) for r in request.responses)
        try:
            if size <= INLINE_TOKENIZE_CHARS:
                prompt_ids, response_ids = self._encode(rm, request)
            else:
                prompt_ids, response_ids = await asyncio.to_thread(self._encode, rm, request)
        except ValueError as exc:
            await context.abort(invalid, str(exc))
            raise
        try:
            rewards = await self._scorer.score(rm, prompt_ids, response_ids)
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {exc}")
            raise
        except ScorerStopped as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise
        return reward_pb2.ScoreResponse(rewards=rewards, model_version=rm.version)


class RewardServer:
    """The reward server's parts, wired explicitly: model, batch scorer, gRPC runtime."""

    def __init__(
        self,
        config: RewardServerConfig,
        registry: CollectorRegistry,
        rm: LoadedRewardModel | None = None,
    ) -> None:
        if config.limits.max_responses > config.batch.max_batch_pairs:
            raise ValueError("limits.max_responses must not exceed batch.max_batch_pairs")
        self.config = config
        self.registry = registry
        self.runtime = ServerRuntime(config.runtime, registry, component="reward")
        self.models = ResidentRewardModels(rm or load(config.model), registry)
        self.scorer: BatchScorer | None = None

    async def add_servicers(self, server: grpc.aio.Server) -> None:
        scorer = BatchScorer(
            self.registry,
            max_batch_pairs=self.config.batch.max_batch_pairs,
            max_queue=self.config.batch.max_queue,
        )
        self.scorer = scorer
        self.runtime.on_stop(lambda: asyncio.to_thread(scorer.stop))
        reward_pb2_grpc.add_RewardServiceServicer_to_server(
            RewardServicer(scorer, self.models, self.config.limits), server
        )

    async def serve(self) -> None:
        await self.runtime.serve(self.add_servicers, SERVICES)

    def start_in_thread(self) -> None:
        self.runtime.start_in_thread(self.add_servicers, SERVICES)

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
