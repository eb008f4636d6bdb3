"""Hugging Face TGI-compatible HTTP API of the policy server: ``POST /generate``,
``POST /generate_stream``, ``POST /`` (either, by ``stream``), ``POST /tokenize``,
``GET /info`` (scope ``infer``) and ``GET /health`` (no key).

Requests are TGI's ``{"inputs", "parameters", "stream"}`` and run the servicer's own path, so
TGI's parameter names map one to one onto ``GenerationParameters``. Errors are TGI's
``{"error", "error_type"}``: 422 ``validation``, 424 ``generation``, 429 ``overloaded``,
503 ``unhealthy`` (plus 401/403 for keys, 404 for an unknown ``model``, 413 for a large body).
Extensions that TGI clients ignore: top-level ``model`` (a resident version or the served
name) and ``user`` (the end-user id that decides the split) in the request; ``generation_id``
and ``model_version`` in the response (and in the last stream event), and the headers
``x-rlhf-model-version`` / ``x-rlhf-generation-ids``. Not supported (422 when set):
``best_of`` > 1, ``decoder_input_details``, ``frequency_penalty``, ``grammar``, ``truncate``,
``typical_p``, ``watermark``, ``adapter_id``. ``top_n_tokens`` lists the sampled token only
(the engine computes no alternatives). Unknown fields are ignored, as TGI does.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web

import rlhf
from rlhf.http import (
    CODE,
    GENERATION_IDS_HEADER,
    MODEL_VERSION_HEADER,
    REQUEST_ID_HEADER,
    EventStream,
    HttpDoor,
    HttpError,
    Style,
    invalid,
    json_response,
)
from rlhf.http_json import Fields, read_json
from rlhf.pool import NotServing
from rlhf.runtime import CallError, Scope
from rlhf.v1 import inference_pb2

if TYPE_CHECKING:
    from services.policy.server import Call, InferenceServicer

_FINISH = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_EOS_TOKEN: "eos_token",
    inference_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}
_UNSUPPORTED = ("frequency_penalty", "grammar", "truncate", "typical_p", "adapter_id")


class TgiRoutes:
    def __init__(self, servicer: InferenceServicer, served_model_name: str, max_queue: int) -> None:
        self._servicer = servicer
        self._alias = served_model_name
        self._max_queue = max_queue

    def _request(
        self, body: dict[str, Any], http: web.Request
    ) -> tuple[inference_pb2.GenerateRequest, Fields]:
        f = Fields(body)
        inputs = f.string("inputs")
        if not inputs:
            raise invalid("`inputs` cannot be empty", "inputs")
        p = f.object("parameters") or Fields({}, "parameters.")
        for name in _UNSUPPORTED:
            p.unsupported(name)
        p.unsupported("watermark", False)
        p.unsupported("decoder_input_details", False)
        best_of = p.integer("best_of", 1)
        if best_of is not None and best_of > 1:
            raise invalid("`best_of` > 1 is not supported by this server", "best_of")
        params = inference_pb2.GenerationParameters(do_sample=bool(p.boolean("do_sample")))
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = p.number(name)
            if value is not None:
                setattr(params, name, value)
        for name, lo in (("top_k", 1), ("max_new_tokens", 1), ("seed", 0)):
            value = p.integer(name, lo, 2**64 - 1)
            if value is not None:
                setattr(params, name, value)
        params.stop.extend(p.strings("stop") or [])
        model = f.string("model") or ""
        if model and model != self._alias and model not in self._servicer.pool.resident():
            raise HttpError(grpc.StatusCode.NOT_FOUND, f"model {model!r} is not served here")
        request = inference_pb2.GenerateRequest(
            prompt=inputs,
            parameters=params,
            user_id=f.string("user") or "",
            model_version="" if model == self._alias else model,
            request_id=http.headers.get("x-request-id", ""),
        )
        return request, p

    @staticmethod
    def _headers(call: Call) -> dict[str, str]:
        return {
            MODEL_VERSION_HEADER: call.policy.version,
            GENERATION_IDS_HEADER: ",".join(call.generation_ids),
            REQUEST_ID_HEADER: call.request_id,
        }

    async def generate(self, http: web.Request) -> web.StreamResponse:
        return await self._generate(http, await read_json(http), wrap=False)

    async def generate_stream(self, http: web.Request) -> web.StreamResponse:
        return await self._stream(http, await read_json(http))

    async def compat(self, http: web.Request) -> web.StreamResponse:
        body = await read_json(http)
        if Fields(body).boolean("stream"):
            return await self._stream(http, body)
        return await self._generate(http, body, wrap=True)

    async def _generate(
        self, http: web.Request, body: dict[str, Any], *, wrap: bool
    ) -> web.Response:
        request, p = self._request(body, http)
        details = bool(p.boolean("details"))
        top_n = p.integer("top_n_tokens", 0) or 0
        request.return_logprobs = details
        call = await self._servicer.start(request, None, stream=False)
        special = frozenset(call.policy.tokenizer.all_special_ids)
        response = await self._servicer.complete(call)
        sample = response.samples[0]
        out: dict[str, Any] = {"generated_text": _full_text(p, request, sample.text)}
        if details:
            tokens = [_token(t, special) for t in sample.tokens]
            out["details"] = {
                "finish_reason": _FINISH[sample.finish_reason],
                "generated_tokens": sample.generated_tokens,
                "seed": _seed(request),
                "prefill": [],
                "tokens": tokens,
                **({"top_tokens": [[t] for t in tokens]} if top_n else {}),
            }
        out["generation_id"] = sample.generation_id
        out["model_version"] = response.model_version
        headers = self._headers(call)
        headers["x-prompt-tokens"] = str(response.prompt_tokens)
        headers["x-generated-tokens"] = str(sample.generated_tokens)
        return json_response([out] if wrap else out, headers=headers)

    async def _stream(self, http: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        request, p = self._request(body, http)
        details = bool(p.boolean("details"))
        top_n = p.integer("top_n_tokens", 0) or 0
        request.return_logprobs = True  # TGI's stream events always carry the logprob
        call = await self._servicer.start(request, None, stream=True)
        special = frozenset(call.policy.tokenizer.all_special_ids)
        events = EventStream(http, Style.TGI, self._headers(call))
        streamed, index = "", 0
        reading = False
        try:
            await events.open()
            async with contextlib.aclosing(self._servicer.stream(call)) as messages:
                reading = True  # from here on, closing the stream cancels the generation
                async for m in messages:
                    index += 1
                    token = _token(m.token, special)
                    event: dict[str, Any] = {"index": index, "token": token}
                    if top_n:
                        event["top_tokens"] = [token]
                    if m.HasField("finished"):
                        done = m.finished
                        # The last token completes any text held back mid-character, so the
                        # concatenated token texts equal generated_text.
                        if done.text.startswith(streamed + token["text"]):
                            token["text"] = done.text[len(streamed) :]
                        event["generated_text"] = _full_text(p, request, done.text)
                        event["details"] = (
                            {
                                "finish_reason": _FINISH[done.finish_reason],
                                "generated_tokens": done.generated_tokens,
                                "seed": _seed(request),
                                "input_length": len(call.gen.prompt_ids),
                            }
                            if details
                            else None
                        )
                        event["generation_id"] = done.generation_id
                        event["model_version"] = call.policy.version
                    else:
                        event["generated_text"] = None
                        event["details"] = None
                    streamed += token["text"]
                    await events.send(event)
        except CallError as error:
            await events.fail(error)
        except ConnectionResetError:
            http[CODE] = grpc.StatusCode.CANCELLED.name  # the client left; generation cancelled
        finally:
            if not reading:
                self._servicer.abandon(call)
        return events.response

    async def tokenize(self, http: web.Request) -> web.Response:
        f = Fields(await read_json(http))
        inputs = f.string("inputs")
        if not inputs:
            raise invalid("`inputs` cannot be empty", "inputs")
        with contextlib.ExitStack() as lease:
            policy = self._servicer.acquire(f.string("model") or "", "", lease)
            encoded = await asyncio.to_thread(
                policy.tokenizer, inputs, add_special_tokens=True, return_offsets_mapping=True
            )
        return json_response(
            [
                {"id": i, "text": inputs[start:stop], "start": start, "stop": stop}
                for i, (start, stop) in zip(
                    encoded["input_ids"], encoded["offset_mapping"], strict=True
                )
            ]
        )

    async def info(self, _http: web.Request) -> web.Response:
        limits = self._servicer.limits
        resident = self._servicer.pool.resident()
        try:
            model_id = self._servicer.pool.choose("")
        except NotServing:
            model_id = None
        return json_response(
            {
                "model_id": model_id or self._alias,
                "model_sha": None,
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": self._max_queue,
                "max_best_of": 1,
                "max_stop_sequences": limits.max_stop_sequences,
                "max_input_tokens": limits.max_input_tokens,
                "max_total_tokens": limits.max_input_tokens + limits.max_new_tokens,
                "validation_workers": 1,
                "max_client_batch_size": 1,
                "router": "rlhf-policy",
                "version": rlhf.__version__,
                "sha": None,
                "docker_label": None,
                "served_model_name": self._alias,
                "model_versions": resident,
            }
        )


def _full_text(p: Fields, request: inference_pb2.GenerateRequest, text: str) -> str:
    return request.prompt + text if p.boolean("return_full_text") else text


def _seed(request: inference_pb2.GenerateRequest) -> int | None:
    params = request.parameters
    return params.seed if params.HasField("seed") else None


def _token(token: inference_pb2.Token, special: frozenset[int]) -> dict[str, Any]:
    return {
        "id": token.id,
        "text": token.text,
        "logprob": token.logprob if token.HasField("logprob") else None,
        "special": token.id in special,
    }


def add_routes(
    door: HttpDoor, servicer: InferenceServicer, served_model_name: str, max_queue: int
) -> None:
    routes = TgiRoutes(servicer, served_model_name, max_queue)
    for path, handler in (
        ("/generate", routes.generate),
        ("/generate_stream", routes.generate_stream),
        ("/", routes.compat),
        ("/tokenize", routes.tokenize),
    ):
        door.route("POST", path, handler, scope=Scope.INFER, style=Style.TGI)
    door.route("GET", "/info", routes.info, scope=Scope.INFER, style=Style.TGI)
