"""``rlhf serve policy``: the InferenceService gRPC server (auth scope ``infer``).

The servicer validates a request, converts it to plain values, hands it to the batching
engine (``engine.py``) and converts the engine's events back to protos. A ``prompt`` or a
``messages`` conversation is rendered and tokenised with the serving version's encoding, the
one it was trained with (``prompts.py``). After a response is complete, the served generation
(with the conversation and the rendered prompt) goes to the publisher (``publisher.py``),
which sends it to Kafka in the background. The request path (``start`` / ``complete`` / ``stream``) is
transport-neutral: the HTTP doors (``http_openai.py``, ``http_tgi.py``) build the same
``GenerateRequest`` and run the same path with a deadline instead of a gRPC context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import grpc
import torch
from prometheus_client import CollectorRegistry

from rlhf import bus
from rlhf.chat import EncodingError, Prompt, prompt_of, prompt_text
from rlhf.config import parse_config
from rlhf.http import HttpDoor, Style
from rlhf.pii import Redactor
from rlhf.pool import ModelPool, NotServing
from rlhf.runtime import CallError, Scope, ServerRuntime

# One split function for every process, so a user lands in the same split everywhere.
from rlhf.split import split_for
from rlhf.v1 import admin_pb2_grpc, events_pb2, inference_pb2, inference_pb2_grpc
from services.policy import http_openai, http_tgi
from services.policy.config import LimitsConfig, PolicyServerConfig
from services.policy.engine import (
    EngineStopped,
    FinishReason,
    Generation,
    GenerationEngine,
    GenerationFailed,
    Policy,
    QueueFull,
    SampleDone,
    TokenEvent,
)
from services.policy.engines import make_engine, place_server
from services.policy.prompts import Rendered, ServedPolicy, render, request_prompt
from services.policy.publisher import GenerationPublisher
from services.policy.sampling import SamplingParams
from services.serving import ServingModels, version_of

log = logging.getLogger(__name__)

INFERENCE = "rlhf.v1.InferenceService"
SERVICES = {INFERENCE: Scope.INFER}
MAX_ID_CHARS = 256
# Prompts longer than this are tokenised off the event loop so they cannot stall other calls.
INLINE_TOKENIZE_CHARS = 8192

_FINISH = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS_TOKEN: inference_pb2.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: inference_pb2.FINISH_REASON_STOP_SEQUENCE,
}
_FAILED = {
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "stopped": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}


class BadRequest(CallError):
    """A request refused or failed, with the gRPC status both doors answer with."""


def sampling_params(request: inference_pb2.GenerateRequest, limits: LimitsConfig) -> SamplingParams:
    """The request's parameters with server defaults applied; BadRequest names a bad field."""
    p = request.parameters

    def invalid(message: str) -> BadRequest:
        return BadRequest(grpc.StatusCode.INVALID_ARGUMENT, message)

    if p.HasField("temperature") and not (p.temperature > 0 and math.isfinite(p.temperature)):
        raise invalid(f"parameters.temperature must be > 0, got {p.temperature:g}")
    if p.HasField("top_p") and not 0 < p.top_p <= 1:
        raise invalid(f"parameters.top_p must be in (0, 1], got {p.top_p:g}")
    if p.HasField("repetition_penalty") and not (
        p.repetition_penalty > 0 and math.isfinite(p.repetition_penalty)
    ):
        raise invalid(f"parameters.repetition_penalty must be > 0, got {p.repetition_penalty:g}")
    max_new = p.max_new_tokens if p.HasField("max_new_tokens") else limits.default_max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens:
        raise invalid(
            f"parameters.max_new_tokens must be in 1..{limits.max_new_tokens}, got {max_new}"
        )
    if len(p.stop) > limits.max_stop_sequences:
        raise invalid(
            f"parameters.stop has {len(p.stop)} entries, the limit is {limits.max_stop_sequences}"
        )
    for s in p.stop:
        if not s or len(s) > limits.max_stop_chars:
            raise invalid(f"parameters.stop entries must be 1..{limits.max_stop_chars} characters")
    # TGI: asking for a temperature, top_p or top_k means asking for sampling.
    do_sample = (
        p.do_sample
        or p.HasField("temperature")
        or p.HasField("top_p")
        or (p.HasField("top_k") and p.top_k > 0)
    )
    return SamplingParams(
        do_sample=do_sample,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else 0,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        max_new_tokens=max_new,
        stop=tuple(p.stop),
        seed=p.seed if p.HasField("seed") else None,
    )


def _effective_parameters(params: SamplingParams) -> inference_pb2.GenerationParameters:
    out = inference_pb2.GenerationParameters(
        do_sample=params.do_sample,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_new_tokens=params.max_new_tokens,
        stop=list(params.stop),
        repetition_penalty=params.repetition_penalty,
    )
    if params.seed is not None:
        out.seed = params.seed
    return out


@dataclass
class Call:
    """One accepted request: what the engine runs and what the response and event need."""

    request_id: str
    request: inference_pb2.GenerateRequest
    params: SamplingParams
    gen: Generation
    generation_ids: list[str]
    # Holds the model version resident until the response is complete.
    lease: contextlib.ExitStack
    # The prompt as the version's encoding rendered it (what the record keeps).
    rendered: Rendered

    @property
    def policy(self) -> Policy:
        return self.gen.policy


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        engine: GenerationEngine,
        pool: ModelPool[ServedPolicy],
        limits: LimitsConfig,
        publisher: GenerationPublisher | None,
        split_fractions: tuple[float, float] = (0.05, 0.05),
    ) -> None:
        self._engine = engine
        self._pool = pool
        self._limits = limits
        self._publisher = publisher
        self._split_fractions = split_fractions  # (validation, test)

    @property
    def limits(self) -> LimitsConfig:
        return self._limits

    @property
    def pool(self) -> ModelPool[ServedPolicy]:
        return self._pool

    async def start(
        self,
        request: inference_pb2.GenerateRequest,
        deadline: float | None,
        *,
        stream: bool,
    ) -> Call:
        """Validates ``request`` and submits it to the engine; ``deadline`` is a
        ``time.monotonic()`` value or None. Raises BadRequest."""
        try:
            prompt = request_prompt(request)
        except EncodingError as exc:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        n = request.n or 1
        if not 1 <= n <= self._limits.max_n:
            raise BadRequest(
                grpc.StatusCode.INVALID_ARGUMENT, f"n must be in 1..{self._limits.max_n}, got {n}"
            )
        for name in ("user_id", "request_id", "model_version"):
            if len(getattr(request, name)) > MAX_ID_CHARS:
                raise BadRequest(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{name} is over {MAX_ID_CHARS} characters"
                )
        params = sampling_params(request, self._limits)
        lease = contextlib.ExitStack()
        try:
            served = self.acquire(request.model_version, request.user_id, lease)
            return await self._submit(
                request, deadline, prompt, params, n, served, lease, stream=stream
            )
        except BaseException:
            lease.close()
            raise

    def acquire(
        self, model_version: str, user_id: str, lease: contextlib.ExitStack
    ) -> ServedPolicy:
        """The version a request runs on (the one asked for, else pinned, canary or promoted),
        held resident by ``lease``, with the encoding it is served with."""
        try:
            version = model_version or self._pool.choose(user_id)
        except NotServing as exc:
            raise BadRequest(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        try:
            return lease.enter_context(self._pool.lease(version))
        except KeyError:
            raise BadRequest(
                grpc.StatusCode.NOT_FOUND,
                f"model_version {version!r} is not served here "
                f"(resident: {', '.join(self._pool.resident()) or 'none'})",
            ) from None

    async def _submit(
        self,
        request: inference_pb2.GenerateRequest,
        deadline: float | None,
        prompt: Prompt,
        params: SamplingParams,
        n: int,
        served: ServedPolicy,
        lease: contextlib.ExitStack,
        *,
        stream: bool,
    ) -> Call:
        rendered = await self._render(served, prompt)
        if rendered.tokens > self._limits.max_input_tokens:
            raise BadRequest(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt is {rendered.tokens} tokens, over the limit of {self._limits.max_input_tokens}",
            )
        # Longer prompts are cut as the version's training cut them (its encoding).
        prompt_ids = rendered.ids
        max_positions = served.policy.max_context
        if max_positions and len(prompt_ids) + params.max_new_tokens > max_positions:
            raise BadRequest(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt ({len(prompt_ids)} tokens) + parameters.max_new_tokens ({params.max_new_tokens}) "
                f"exceeds the model's context of {max_positions}",
            )
        try:
            gen = self._engine.submit(
                served.policy,
                prompt_ids,
                params,
                n,
                deadline,
                stream=stream,
                token_texts=request.return_logprobs,
            )
        except QueueFull as exc:
            raise BadRequest(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {exc}") from exc
        except EngineStopped as exc:
            raise BadRequest(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        except ValueError as exc:  # over the engine's own limits (n, tokens per sequence)
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        request_id = request.request_id or uuid.uuid4().hex
        ids = [uuid.uuid4().hex for _ in range(n)]
        return Call(request_id, request, params, gen, ids, lease, rendered)

    @staticmethod
    async def _render(served: ServedPolicy, prompt: Prompt) -> Rendered:
        chars = len(prompt) if isinstance(prompt, str) else sum(len(m.content) for m in prompt)
        try:
            if chars <= INLINE_TOKENIZE_CHARS:
                return render(served, prompt)
            return await asyncio.to_thread(render, served, prompt)
        except EncodingError as exc:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def _sample(self, call: Call, done: SampleDone) -> inference_pb2.Sample:
        sample = inference_pb2.Sample(
            generation_id=call.generation_ids[done.index],
            index=done.index,
            text=done.text,
            finish_reason=_FINISH[done.finish_reason],
            generated_tokens=len(done.token_ids),
        )
        if call.request.return_logprobs:
            sample.tokens.extend(
                inference_pb2.Token(id=t, text=text, logprob=lp)
                for t, text, lp in zip(done.token_ids, done.token_texts, done.logprobs, strict=True)
            )
        return sample

    def _publish(self, call: Call, samples: list[SampleDone]) -> None:
        if self._publisher is None:
            return
        event = events_pb2.ServedGeneration(
            event_id=uuid.uuid4().hex,
            created_at_ms=int(time.time() * 1000),
            request_id=call.request_id,
            prompt=call.request.prompt,
            messages=call.request.messages,
            rendered_prompt=call.rendered.text,
            parameters=_effective_parameters(call.params),
            model_version=call.policy.version,
            user_id=call.request.user_id,
            split=split_for(
                call.request.user_id,
                prompt_text(prompt_of(call.request.prompt, call.request.messages)),
                *self._split_fractions,
            ),
            samples=[
                events_pb2.GeneratedSample(
                    generation_id=call.generation_ids[s.index],
                    text=s.text,
                    finish_reason=_FINISH[s.finish_reason],
                    token_ids=s.token_ids,
                    logprobs=s.logprobs,
                )
                for s in samples
            ],
        )
        self._publisher.publish(event)

    @staticmethod
    def abandon(call: Call) -> None:
        """Stops a started call whose results will not be read (its client left before
        ``complete`` or ``stream`` began): cancels the generation, releases the version."""
        call.gen.cancel()
        call.lease.close()

    async def complete(self, call: Call) -> inference_pb2.GenerateResponse:
        """Waits for every sample of ``call``, publishes it, returns the response."""
        try:
            samples = await call.gen.result()
        except GenerationFailed as failed:
            raise BadRequest(_FAILED[failed.reason], str(failed)) from None
        except BaseException:
            call.gen.cancel()  # the client went away or its deadline passed
            raise
        finally:
            call.lease.close()
        self._publish(call, samples)
        return inference_pb2.GenerateResponse(
            request_id=call.request_id,
            model_version=call.policy.version,
            prompt_tokens=len(call.gen.prompt_ids),
            samples=[self._sample(call, s) for s in samples],
        )

    async def stream(
        self, call: Call
    ) -> AsyncGenerator[inference_pb2.GenerateStreamResponse, None]:
        """One event per token of ``call``; publishes once every sample finished."""
        samples: list[SampleDone] = []
        logprobs = call.request.return_logprobs
        try:
            event: TokenEvent
            async for event in call.gen.events():
                message = inference_pb2.GenerateStreamResponse(
                    request_id=call.request_id,
                    model_version=call.policy.version,
                    index=event.index,
                    token=inference_pb2.Token(
                        id=event.token_id,
                        text=event.text,
                        logprob=event.logprob if logprobs else None,
                    ),
                )
                if event.done is not None:
                    samples.append(event.done)
                    message.finished.CopyFrom(self._sample(call, event.done))
                yield message
        except GenerationFailed as failed:
            raise BadRequest(_FAILED[failed.reason], str(failed)) from None
        except BaseException:
            call.gen.cancel()
            raise
        finally:
            call.lease.close()
        self._publish(call, sorted(samples, key=lambda s: s.index))

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        try:
            call = await self.start(request, _deadline(context), stream=False)
            return await self.complete(call)
        except BadRequest as bad:
            await context.abort(bad.code, bad.message)
            raise  # unreachable: abort raises

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        try:
            call = await self.start(request, _deadline(context), stream=True)
            # aclosing: a cancelled call closes the inner generator now, which cancels the
            # generation, rather than whenever the garbage collector finalises it.
            async with contextlib.aclosing(self.stream(call)) as messages:
                async for message in messages:
                    yield message
        except BadRequest as bad:
            await context.abort(bad.code, bad.message)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


class PolicyServer:
    """The policy server's parts, wired explicitly: model, engine, publisher, gRPC runtime."""

    def __init__(
        self,
        config: PolicyServerConfig,
        registry: CollectorRegistry,
    ) -> None:
        self.config = config
        self.registry = registry
        self.runtime = ServerRuntime(config.runtime, registry, component="policy")
        self.engine: GenerationEngine = make_engine(config, registry)
        engine = self.engine
        fixed_name = config.model.version if config.model.path else ""
        # Each version is served with the encoding recorded in its manifest.
        self.models: ServingModels[ServedPolicy] = ServingModels(
            role=events_pb2.MODEL_ROLE_POLICY,
            path=config.model.path,
            version=config.model.version,
            registry_dir=config.model.registry,
            follow=config.follow,
            models_topic=config.streams.topics.models,
            load=lambda path: ServedPolicy.load(engine, path, version_of(path, fixed_name)),
            warm_up=lambda served: engine.warm_up(served.policy),
            release=lambda served: engine.unload(served.policy),
            metrics=registry,
            report=lambda name, ok, detail: self.runtime.set_condition(INFERENCE, name, ok, detail),
        )
        self.pool = self.models.pool
        self.publisher: GenerationPublisher | None = None

    async def add_servicers(self, server: grpc.aio.Server) -> None:
        cfg = self.config
        pub = cfg.publish
        if pub.bootstrap_servers:
            producer = bus.Producer(
                pub.bootstrap_servers, client_id="rlhf-policy", registry=self.registry
            )
            publisher = GenerationPublisher(
                producer,
                self.registry,
                buffer_size=pub.buffer_size,
                batch_size=pub.batch_size,
                ack_timeout_s=pub.ack_timeout_s,
                max_backoff_s=pub.max_backoff_s,
                redactor=Redactor(pub.pii_kinds),
                topic=cfg.streams.topics.prompts,
            )
            self.publisher = publisher
            self.runtime.on_stop(lambda: asyncio.to_thread(publisher.close, pub.close_timeout_s))
        else:
            log.warning(
                "publish.bootstrap_servers is empty: served generations are NOT published to Kafka"
            )
        engine = self.engine
        # Registered last, so it runs first: the engine stops before the publisher flushes.
        self.runtime.on_stop(lambda: asyncio.to_thread(engine.stop))
        servicer = InferenceServicer(
            engine,
            self.pool,
            cfg.limits,
            self.publisher,
            (cfg.streams.validation_fraction, cfg.streams.test_fraction),
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        door = HttpDoor(self.runtime, style=Style.OPENAI)
        http_openai.add_routes(door, servicer, cfg.api.served_model_name)
        http_tgi.add_routes(door, servicer, cfg.api.served_model_name, cfg.engine.max_queue)
        door.health("/health", [INFERENCE], style=Style.TGI)
        admin = self.models.admin_servicer()
        if admin is not None:
            admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
        # Loading starts once the runtime can report readiness; stops after the engine.
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
        PolicyServerConfig,
        argv,
        prog="rlhf serve policy",
        description="Serve a policy over gRPC (InferenceService) with continuous batching; "
        "every served generation is published to Kafka topic rlhf.prompts.",
        env_prefix="RLHF_POLICY_",
    )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        place_server(config.engine)
    except ValueError as exc:
        print(f"rlhf serve policy: error: {exc}", file=sys.stderr)
        return 2
    if config.engine.torch_threads:
        torch.set_num_threads(config.engine.torch_threads)
    # The engine's worker thread runs Python between tensor operations; with the default 5 ms
    # switch interval the gRPC event loop waits that long for the GIL at every turn, and
    # requests arriving under load trickle into the batch (time to first token grows ~10x).
    sys.setswitchinterval(config.engine.switch_interval_ms / 1000)
    server = PolicyServer(config, CollectorRegistry())
    asyncio.run(server.serve())
    return 0
