"""OpenAI-compatible HTTP API of the policy server: ``POST /v1/completions``,
``POST /v1/chat/completions`` and ``GET /v1/models`` (scope ``infer``).

Each request becomes the same ``GenerateRequest`` a gRPC client sends and runs the servicer's
own path (validation, routing to a version, engine, Kafka record); this file only maps JSON
fields to the proto and the response back to OpenAI's shapes. Differences from OpenAI's API,
on purpose:

* ``model`` is a resident version (``GET /v1/models``) or the served name (``served_model_name``,
  the server's choice: pinned, canary or promoted); the response's ``model`` is the version
  that produced it. Each choice carries ``generation_id`` (cite it in feedback); the headers
  ``x-rlhf-model-version``, ``x-rlhf-generation-ids`` (comma-separated, by choice index) and
  ``x-rlhf-request-id`` repeat them.
* Logprobs are log p(token) at temperature 1 (as in the gRPC API and the Kafka record). The
  engine computes no alternatives, so each position's ``top_logprobs`` lists the sampled token
  only (the API allows fewer entries than asked for).
* Unknown fields are refused (400), as OpenAI does; fields this server does not implement
  (``frequency_penalty``, ``logit_bias``, ``tools``, ...) are refused unless they hold their
  no-op default. TGI's ``top_k`` and ``repetition_penalty`` are accepted as extensions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web

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
from rlhf.runtime import CallError, Scope
from rlhf.v1 import inference_pb2

if TYPE_CHECKING:
    from services.policy.server import Call, InferenceServicer

MAX_STOP = 4  # OpenAI's limit on stop sequences
_COMMON = {
    "model", "n", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
    "stream_options", "user", "logprobs", "frequency_penalty", "presence_penalty",
    "logit_bias", "top_k", "repetition_penalty",
}  # fmt: skip
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
    "tool_choice", "parallel_tool_calls", "store", "metadata", "service_tier", "modalities",
}  # fmt: skip
_FINISH = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_EOS_TOKEN: "stop",
    inference_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
}


@dataclass(frozen=True)
class _Shape:
    """What the response needs beyond the proto: which API, and what the client asked for."""

    chat: bool
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo: bool
    stop: tuple[str, ...]
    created: int


def _parameters(f: Fields, max_tokens: int | None) -> inference_pb2.GenerationParameters:
    """Sampling parameters; unset temperature means 1 (OpenAI samples by default), 0 greedy."""
    params = inference_pb2.GenerationParameters()
    if max_tokens is not None:
        params.max_new_tokens = max_tokens
    stop = f.strings("stop", MAX_STOP)
    if stop:
        params.stop.extend(stop)
    seed = f.integer("seed", 0, 2**64 - 1)
    if seed is not None:
        params.seed = seed
    repetition_penalty = f.number("repetition_penalty")
    if repetition_penalty is not None:
        params.repetition_penalty = repetition_penalty
    temperature = f.number("temperature", 0.0, 2.0)
    top_p = f.number("top_p", 0.0, 1.0)
    top_k = f.integer("top_k", 0)
    if temperature is None or temperature > 0:
        params.do_sample = True
        params.temperature = 1.0 if temperature is None else temperature
        if top_p is not None:
            params.top_p = top_p
        if top_k:
            params.top_k = top_k
    return params


class OpenAIRoutes:
    def __init__(self, servicer: InferenceServicer, served_model_name: str) -> None:
        self._servicer = servicer
        self._alias = served_model_name

    def _model_version(self, f: Fields) -> str:
        model = f.string("model")
        if not model:
            raise invalid("you must provide a model parameter", "model")
        if model == self._alias:
            return ""
        if model not in self._servicer.pool.resident():
            served = ", ".join([self._alias, *self._servicer.pool.resident()])
            raise HttpError(
                grpc.StatusCode.NOT_FOUND,
                f"The model '{model}' does not exist or is not served here (served: {served})",
                param="model",
                error_code="model_not_found",
            )
        return model

    def _request(
        self, f: Fields, http: web.Request, *, chat: bool
    ) -> tuple[inference_pb2.GenerateRequest, _Shape]:
        f.only(CHAT_FIELDS if chat else COMPLETION_FIELDS)
        for name in ("frequency_penalty", "presence_penalty"):
            f.unsupported(name, 0)
        f.unsupported("logit_bias")
        if chat:
            for name in ("tools", "tool_choice", "response_format", "modalities"):
                f.unsupported(name)
            max_tokens = f.integer("max_completion_tokens", 1)
            if max_tokens is None:
                max_tokens = f.integer("max_tokens", 1)
            logprobs = bool(f.boolean("logprobs"))
            top = f.integer("top_logprobs", 0, 20) or 0
            if top and not logprobs:
                raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
            echo = False
        else:
            f.unsupported("suffix")
            max_tokens = f.integer("max_tokens", 1)
            asked = f.integer("logprobs", 0, 5)
            logprobs, top = asked is not None, asked or 0
            echo = bool(f.boolean("echo"))
            if echo and logprobs:
                raise invalid("echo with logprobs is not supported (no prompt logprobs)", "echo")
        request = inference_pb2.GenerateRequest(
            parameters=_parameters(f, max_tokens),
            n=f.integer("n", 1) or 1,
            return_logprobs=logprobs,
            user_id=f.string("user") or "",
            model_version=self._model_version(f),
            request_id=http.headers.get("x-request-id", ""),
        )
        best_of = None if chat else f.integer("best_of", 1)
        if best_of is not None and best_of != request.n:
            raise invalid("best_of is not supported; ask for n samples and rank them", "best_of")
        if chat:
            _set_messages(request, f)
        else:
            request.prompt = _prompt(f)
        options = f.object("stream_options")
        stream = bool(f.boolean("stream"))
        if options is not None and not stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")
        shape = _Shape(
            chat=chat,
            stream=stream,
            include_usage=bool(options and options.boolean("include_usage")),
            logprobs=logprobs,
            top_logprobs=top,
            echo=echo,
            stop=tuple(request.parameters.stop),
            created=int(time.time()),
        )
        return request, shape

    async def models(self, _request: web.Request) -> web.Response:
        names = [self._alias, *self._servicer.pool.resident()]
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "rlhf"} for name in names]
        return json_response({"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, http: web.Request, *, chat: bool) -> web.StreamResponse:
        proto, shape = self._request(Fields(await read_json(http)), http, chat=chat)
        call = await self._servicer.start(proto, None, stream=shape.stream)
        headers = {
            MODEL_VERSION_HEADER: call.policy.version,
            GENERATION_IDS_HEADER: ",".join(call.generation_ids),
            REQUEST_ID_HEADER: call.request_id,
        }
        if shape.stream:
            return await self._stream(http, call, shape, headers)
        response = await self._servicer.complete(call)
        body = _envelope(call, shape, chunk=False)
        body["choices"] = [_choice(call, shape, s) for s in response.samples]
        body["usage"] = _usage(response.prompt_tokens, response.samples)
        return json_response(body, headers=headers)

    async def _stream(
        self, http: web.Request, call: Call, shape: _Shape, headers: dict[str, str]
    ) -> web.StreamResponse:
        events = EventStream(http, Style.OPENAI, headers)
        holdback = max((len(s) for s in shape.stop), default=1) - 1
        texts = [_StreamedText(holdback) for _ in call.generation_ids]
        finished: list[inference_pb2.Sample] = []
        reading = False
        try:
            await events.open()
            for index, generation_id in enumerate(call.generation_ids):
                opening = {"role": "assistant", "content": ""} if shape.chat else None
                text = call.request.prompt if shape.echo else ""
                if opening is not None or text:
                    await events.send(_chunk(call, shape, index, generation_id, text, opening))
            async with contextlib.aclosing(self._servicer.stream(call)) as messages:
                reading = True  # from here on, closing the stream cancels the generation
                async for m in messages:
                    done = m.finished if m.HasField("finished") else None
                    if done is None:
                        piece = texts[m.index].push(m.token.text)
                    else:
                        finished.append(done)
                        piece = texts[m.index].finish(_text(done, shape))
                    if piece or done is not None or shape.logprobs:
                        await events.send(_token_chunk(call, shape, m, piece, done))
            if shape.include_usage:
                usage_chunk = _envelope(call, shape, chunk=True)
                usage_chunk["choices"] = []
                usage_chunk["usage"] = _usage(len(call.gen.prompt_ids), finished)
                await events.send(usage_chunk)
            await events.send("[DONE]")
        except CallError as error:
            await events.fail(error)
        except ConnectionResetError:
            http[CODE] = grpc.StatusCode.CANCELLED.name  # the client left; generation cancelled
        finally:
            if not reading:
                self._servicer.abandon(call)
        return events.response


class _StreamedText:
    """One choice's streamed text. OpenAI's text ends before a stop sequence, so text that
    could still become the start of one is held back; at the end the final text completes
    what was sent (so the concatenated stream always equals the final text)."""

    def __init__(self, holdback: int) -> None:
        self._holdback = holdback
        self._text = ""
        self._sent = 0

    def push(self, piece: str) -> str:
        self._text += piece
        upto = max(self._sent, len(self._text) - self._holdback)
        out, self._sent = self._text[self._sent : upto], upto
        return out

    def finish(self, final: str) -> str:
        """The rest of ``final`` (the sample's text, stop sequence cut) after what was sent."""
        sent = self._text[: self._sent]
        return final[len(sent) :] if final.startswith(sent) else ""


def _prompt(f: Fields) -> str:
    value = f.data.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        raise invalid("prompt: one prompt per request is supported (send several requests)")
    prompt = f.string("prompt")
    if prompt is None:
        raise invalid("you must provide a prompt", "prompt")
    return prompt


def _set_messages(request: inference_pb2.GenerateRequest, f: Fields) -> None:
    """OpenAI's messages as ``GenerateRequest.messages``: the servicer renders them with the
    serving version's chat template and checks the roles and contents (400 naming the turn)."""
    turns = f.data.get("messages")
    if not isinstance(turns, list) or not turns:
        raise invalid("messages: expected a non-empty array of {role, content} objects", "messages")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise invalid(
                f"Invalid type for 'messages[{i}]': expected an object.", f"messages[{i}]"
            )
        m = Fields(turn, f"messages[{i}].")
        m.only(("role", "content", "name"))
        m.unsupported("name")
        role = m.string("role")
        if role is None:
            raise invalid(f"messages[{i}].role is required", m.name("role"))
        # OpenAI's newer name for the system turn.
        request.messages.add(role="system" if role == "developer" else role, content=_content(m))


def _content(m: Fields) -> str:
    """A turn's text: a string, or text content parts joined (other kinds are refused)."""
    value = m.data.get("content")
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise invalid(
                    f"{m.name('content')}[{j}]: only text content parts are supported",
                    m.name("content"),
                )
            text = Fields(part, f"{m.name('content')}[{j}].").string("text")
            texts.append(text or "")
        return "".join(texts)
    return m.string("content") or ""


def _text(sample: inference_pb2.Sample, shape: _Shape) -> str:
    """The sample's text as OpenAI returns it: without the stop sequence that ended it."""
    text = sample.text
    if sample.finish_reason == inference_pb2.FINISH_REASON_STOP_SEQUENCE:
        for stop in sorted(shape.stop, key=len, reverse=True):
            if text.endswith(stop):
                return text[: len(text) - len(stop)]
    return text


def _envelope(call: Call, shape: _Shape, *, chunk: bool) -> dict[str, Any]:
    if shape.chat:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        prefix = "chatcmpl-"
    else:
        kind, prefix = "text_completion", "cmpl-"
    return {
        "id": prefix + call.request_id,
        "object": kind,
        "created": shape.created,
        "model": call.policy.version,
        "system_fingerprint": call.policy.version,
    }


def _usage(prompt_tokens: int, samples: Sequence[inference_pb2.Sample]) -> dict[str, int]:
    completion = sum(s.generated_tokens for s in samples)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _logprobs(
    shape: _Shape, tokens: Sequence[inference_pb2.Token], offset: int
) -> dict[str, Any] | None:
    if not shape.logprobs:
        return None
    if shape.chat:
        return {
            "content": [
                {
                    "token": t.text,
                    "logprob": t.logprob,
                    "bytes": list(t.text.encode()),
                    "top_logprobs": [
                        {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}
                    ]
                    if shape.top_logprobs
                    else [],
                }
                for t in tokens
            ],
            "refusal": None,
        }
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{t.text: t.logprob} for t in tokens] if shape.top_logprobs else None,
        "text_offset": offsets,
    }


def _choice(call: Call, shape: _Shape, sample: inference_pb2.Sample) -> dict[str, Any]:
    text = _text(sample, shape)
    choice: dict[str, Any] = {"index": sample.index}
    if shape.chat:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = call.request.prompt + text if shape.echo else text
    choice["logprobs"] = _logprobs(shape, sample.tokens, 0)
    choice["finish_reason"] = _FINISH[sample.finish_reason]
    choice["generation_id"] = sample.generation_id
    return choice


def _chunk(
    call: Call,
    shape: _Shape,
    index: int,
    generation_id: str,
    text: str,
    delta: dict[str, Any] | None = None,
    logprobs: dict[str, Any] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index}
    if shape.chat:
        choice["delta"] = delta if delta is not None else ({"content": text} if text else {})
    else:
        choice["text"] = text
    choice["logprobs"] = logprobs
    choice["finish_reason"] = finish_reason
    choice["generation_id"] = generation_id
    body = _envelope(call, shape, chunk=True)
    body["choices"] = [choice]
    return body


def _token_chunk(
    call: Call,
    shape: _Shape,
    m: inference_pb2.GenerateStreamResponse,
    piece: str,
    done: inference_pb2.Sample | None,
) -> dict[str, Any]:
    finish = _FINISH[done.finish_reason] if done is not None else None
    logprobs = _logprobs(shape, [m.token], 0)
    return _chunk(call, shape, m.index, call.generation_ids[m.index], piece, None, logprobs, finish)


def add_routes(door: HttpDoor, servicer: InferenceServicer, served_model_name: str) -> None:
    routes = OpenAIRoutes(servicer, served_model_name)
    door.route("GET", "/v1/models", routes.models, scope=Scope.INFER)
    door.route("POST", "/v1/completions", routes.completions, scope=Scope.INFER)
    door.route("POST", "/v1/chat/completions", routes.chat_completions, scope=Scope.INFER)
