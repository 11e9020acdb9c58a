"""The OpenAI-compatible HTTP API (aiohttp, on the frontend's event loop).

`/v1/completions`, `/v1/chat/completions` (the tokenizer's chat template) and `/v1/models`,
with streaming as server-sent events; `/health` and `/version` as vLLM's. `model` names the
base model or an adapter, as in vLLM. Every request goes through the `GenerationService`,
as the gRPC API's do, so limits, errors and metrics are the same; errors become HTTP
statuses with OpenAI-shaped bodies (`{"error": {"message", "type", "param", "code"}}`),
refused fields named as in OpenAI's API (`max_tokens`, `prompt`, `messages`).

Authentication is a hook: `authorize(authorization_header_or_None)` returns an error
message to refuse a `/v1/` request with 401, or None to let it through. `/health` and
`/version` are open, as in vLLM: probes and load balancers carry no token, and they tell
only whether the server takes requests and its version.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from frontend.errors import ServiceError, StatusCode, as_service_error
from frontend.generation import accumulate
from frontend.generation_service import GenerationService, GenerationStream
from frontend.validation import Field, FieldNames, InvalidRequest
from protos.loraserve.v1 import serving_pb2
from settings.version import package_version

Authorize = Callable[[str | None], str | None]
REQUEST_ID_HEADER = "X-Request-Id"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default (the gRPC API's is greedy)
# Every 429 says when to retry. A full queue (or adapter tier) empties as requests finish,
# which at any load is seconds away: one second, the header's smallest whole value.
RETRY_AFTER_S = 1
OPEN_PATHS = frozenset({"/health", "/version"})  # no token needed: see the module's docstring

HTTP_STATUS = {
    StatusCode.INVALID_ARGUMENT: 400, StatusCode.FAILED_PRECONDITION: 400, StatusCode.OUT_OF_RANGE: 400,
    StatusCode.UNAUTHENTICATED: 401, StatusCode.PERMISSION_DENIED: 403, StatusCode.NOT_FOUND: 404,
    StatusCode.ALREADY_EXISTS: 409, StatusCode.RESOURCE_EXHAUSTED: 429, StatusCode.UNIMPLEMENTED: 501,
    StatusCode.UNAVAILABLE: 503, StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "invalid_request_error", 409: "invalid_request_error", 429: "rate_limit_error"}

COMPLETION, CHAT_COMPLETION, CHAT_CHUNK = "text_completion", "chat.completion", "chat.completion.chunk"
Chunks = AsyncIterator[tuple[int, serving_pb2.GenerateStreamResponse]]


@dataclass(frozen=True)
class RequestFields:
    """How one endpoint names the request fields validation refuses: `params` as OpenAI's error
    `param`, and in messages as `param` in backticks, the prompt's two forms as phrases."""

    params: Mapping[Field, str]
    prompt_as_text: str
    prompt_as_ids: str

    @property
    def names(self) -> FieldNames:
        return ({field: f"`{param}`" for field, param in self.params.items()}
                | {Field.TEXT: self.prompt_as_text, Field.INPUT_IDS: self.prompt_as_ids})

    def renamed(self, field: Field, param: str) -> RequestFields:
        return replace(self, params={**self.params, field: param})


_SAMPLING_PARAMS = {Field.MAX_NEW_TOKENS: "max_tokens", Field.TEMPERATURE: "temperature", Field.TOP_P: "top_p",
                    Field.TOP_K: "top_k", Field.STOP: "stop"}
COMPLETION_FIELDS = RequestFields(
    {Field.PROMPT: "prompt", Field.TEXT: "prompt", Field.INPUT_IDS: "prompt"} | _SAMPLING_PARAMS,
    prompt_as_text="`prompt` as text", prompt_as_ids="`prompt` as token ids")
CHAT_FIELDS = RequestFields(
    {Field.PROMPT: "messages", Field.TEXT: "messages", Field.INPUT_IDS: "messages"} | _SAMPLING_PARAMS,
    prompt_as_text="`messages`", prompt_as_ids="token ids to /v1/completions")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param

    @classmethod
    def invalid(cls, message: str, param: str | None = None) -> ApiError:
        return cls(400, message, "invalid_argument", param)

    @classmethod
    def of(cls, error: Exception, model: str | None = None, fields: RequestFields | None = None) -> ApiError:
        """The HTTP error for a service error; `fields` names a refused field as the endpoint does."""
        failure = as_service_error(error)
        code, message = failure.code, failure.message
        if code is StatusCode.NOT_FOUND and model is not None:
            return cls(404, f"The model `{model}` does not exist: {message}", "model_not_found", "model")
        if isinstance(failure, InvalidRequest) and fields is not None:
            param = fields.params[failure.field] if failure.field is not None else None
            return cls.invalid(failure.describe(fields.names), param)
        return cls(HTTP_STATUS.get(code, 500), message, code.name.lower())

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": ERROR_TYPE.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else None
        return web.json_response(self.body(), status=self.status, headers=headers)


@dataclass(frozen=True)
class Prompted:
    """What a completion request asks for, parsed: one GenerateRequest per prompt."""

    model: str
    requests: list[serving_pb2.GenerateRequest]
    stream: bool
    include_usage: bool
    logprobs: bool
    fields: RequestFields


class OpenAIApi:
    def __init__(self, service: GenerationService, authorize: Authorize | None = None) -> None:
        self._service = service
        self._authorize = authorize

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_and_auth])
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    @web.middleware
    async def _errors_and_auth(self, request: web.Request,
                               handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if self._authorize is not None and request.path not in OPEN_PATHS:
            refusal = self._authorize(request.headers.get("Authorization"))
            if refusal is not None:
                return ApiError(401, refusal, "invalid_api_key").response()
        try:
            return await handler(request)
        except ApiError as error:
            return error.response()
        except web.HTTPException as error:  # unknown route, wrong method
            return ApiError(error.status, error.reason, "not_found" if error.status == 404 else "invalid_request"
                            ).response()

    # /health, /version -------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """200 (empty, as vLLM's) while generation requests are taken; 503 with the reason otherwise."""
        try:
            self._service.check_serving()
        except ServiceError as error:
            raise ApiError.of(error) from None
        return web.Response()

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": package_version()})

    # /v1/models -------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        """The base model's card also gives the adapter root (null without one), where adapter paths lie."""
        base = self._base_model()
        adapter_root = self._service.server_info.adapter_root or None
        try:
            adapters = (await self._service.list_adapters()).adapters
        except Exception as error:  # noqa: BLE001 - becomes an HTTP status
            raise ApiError.of(error) from None
        created = int(time.time())
        cards = [_model_card(base, created, root=base, parent=None) | {"adapter_root": adapter_root}]
        cards += [_model_card(a.name, created, root=a.path, parent=base) for a in adapters]
        return web.json_response({"object": "list", "data": cards})

    # /v1/completions ----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        prompts = _prompts(body.get("prompt"))
        _refuse_unsupported(body, echo=False, suffix=None, best_of=1)
        logprobs = _optional(body, "logprobs", int)
        if logprobs not in (None, 0):
            raise ApiError.invalid("only logprobs=0 is supported (the sampled token's log-probability)", "logprobs")
        request_id = _request_id(request)
        parsed = self._parse(body, request_id, prompts, logprobs is not None,
                             _optional(body, "max_tokens", int, COMPLETIONS_DEFAULT_MAX_TOKENS), COMPLETION_FIELDS)
        response_id = f"cmpl-{request_id}"
        if parsed.stream:
            return await self._stream(request, parsed, response_id, self._completion_chunk, COMPLETION)
        return await self._complete(parsed, response_id, self._completion)

    # /v1/chat/completions -----------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        messages = _messages(body.get("messages"))
        _refuse_unsupported(body)
        if _optional(body, "top_logprobs", int) not in (None, 0):
            raise ApiError.invalid("only top_logprobs=0 is supported", "top_logprobs")
        try:
            prompt_ids = await self._service.encode_chat(messages)
        except ServiceError as error:
            raise ApiError.of(error, fields=CHAT_FIELDS) from None
        max_tokens = _optional(body, "max_completion_tokens", int)
        fields = CHAT_FIELDS.renamed(Field.MAX_NEW_TOKENS, "max_completion_tokens")
        if max_tokens is None:
            max_tokens, fields = _optional(body, "max_tokens", int), CHAT_FIELDS
        request_id = _request_id(request)
        parsed = self._parse(body, request_id, [prompt_ids], bool(_optional(body, "logprobs", bool, False)),
                             max_tokens, fields)
        response_id = f"chatcmpl-{request_id}"
        if parsed.stream:
            return await self._stream(request, parsed, response_id, self._chat_chunk, CHAT_CHUNK)
        return await self._complete(parsed, response_id, self._chat_completion)

    # Shared -----------------------------------------------------------------------------

    def _base_model(self) -> str:
        info = self._service.server_info
        if info is None:
            raise ApiError(503, "the server is starting; retry shortly", "unavailable")
        return info.model

    def _parse(self, body: dict[str, Any], request_id: str, prompts: list[str | list[int]], logprobs: bool,
               max_tokens: int | None, fields: RequestFields) -> Prompted:
        base = self._base_model()
        model = _optional(body, "model", str, base)
        sampling = _sampling(body, max_tokens, fields.params[Field.MAX_NEW_TOKENS], logprobs)
        requests = []
        for index, prompt in enumerate(prompts):
            generate = serving_pb2.GenerateRequest(
                request_id=request_id if len(prompts) == 1 else f"{request_id}-{index}",
                adapter="" if model == base else model, sampling=sampling)
            if isinstance(prompt, str):
                generate.text = prompt
            else:
                generate.input_ids.extend(prompt)
            requests.append(generate)
        options = _optional(body, "stream_options", dict, {}) or {}
        return Prompted(model=model, requests=requests, stream=bool(_optional(body, "stream", bool, False)),
                        include_usage=bool(options.get("include_usage")), logprobs=logprobs, fields=fields)

    async def _chunks(self, parsed: Prompted) -> Chunks:
        """(prompt index, stream message) of every prompt's generation, interleaved as they come."""
        try:
            if len(parsed.requests) == 1:
                async with aclosing(self._service.generate(parsed.requests[0])) as chunks:
                    async for chunk in chunks:
                        yield 0, chunk
                return
            async with aclosing(_merged([self._service.generate(r) for r in parsed.requests])) as chunks:
                async for item in chunks:
                    yield item
        except Exception as error:  # noqa: BLE001 - becomes an HTTP status or an error event
            raise ApiError.of(error, parsed.model if parsed.requests[0].adapter else None, parsed.fields) from None

    async def _complete(self, parsed: Prompted, response_id: str, render: Callable[..., dict]) -> web.Response:
        results = [serving_pb2.GenerateResponse() for _ in parsed.requests]
        async with aclosing(self._chunks(parsed)) as chunks:
            async for index, chunk in chunks:
                accumulate(results[index], chunk)
        body = render(response_id, parsed, results)
        return web.json_response(body, headers={REQUEST_ID_HEADER: parsed.requests[0].request_id})

    async def _stream(self, request: web.Request, parsed: Prompted, response_id: str,
                      render: Callable[..., list[dict]], kind: str) -> web.StreamResponse:
        """Server-sent events; an error before the first message is an HTTP status, after it an event."""
        usage = serving_pb2.Usage()
        started: set[int] = set()
        async with aclosing(self._chunks(parsed)) as chunks:
            first = await anext(chunks, None)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                   REQUEST_ID_HEADER: parsed.requests[0].request_id})
            await response.prepare(request)
            try:
                item = first
                while item is not None:
                    index, chunk = item
                    for event in render(response_id, parsed, index, chunk, index not in started):
                        await _send_event(response, event)
                    started.add(index)
                    if chunk.finished:
                        usage.prompt_tokens += chunk.usage.prompt_tokens
                        usage.completion_tokens += chunk.usage.completion_tokens
                    item = await anext(chunks, None)
            except ApiError as error:
                await _send_event(response, error.body())
            else:
                if parsed.include_usage:
                    await _send_event(response, _envelope(response_id, parsed, kind, [], _usage(usage)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _chat_completion(self, response_id: str, parsed: Prompted,
                         results: list[serving_pb2.GenerateResponse]) -> dict[str, Any]:
        result = results[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "logprobs": self._chat_logprobs(result.token_ids, result.logprobs) if parsed.logprobs else None,
                  "finish_reason": result.finish_reason}
        return _envelope(response_id, parsed, CHAT_COMPLETION, [choice], _usage(result.usage))

    def _chat_chunk(self, response_id: str, parsed: Prompted, index: int, chunk: serving_pb2.GenerateStreamResponse,
                    first: bool) -> list[dict[str, Any]]:
        """The first message of a choice announces the role, as OpenAI's stream does."""
        events = []
        if first:
            role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
            events.append(_envelope(response_id, parsed, CHAT_CHUNK, [role], None))
        delta: dict[str, Any] = {"content": chunk.text} if chunk.text else {}
        choice = {"index": index, "delta": delta,
                  "logprobs": self._chat_logprobs(chunk.token_ids, chunk.logprobs) if parsed.logprobs else None,
                  "finish_reason": chunk.finish_reason or None}
        events.append(_envelope(response_id, parsed, CHAT_CHUNK, [choice], None))
        return events

    def _completion(self, response_id: str, parsed: Prompted,
                    results: list[serving_pb2.GenerateResponse]) -> dict[str, Any]:
        choices, usage = [], serving_pb2.Usage()
        for index, result in enumerate(results):
            choices.append({"index": index, "text": result.text, "finish_reason": result.finish_reason,
                            "logprobs": self._completion_logprobs(result) if parsed.logprobs else None})
            usage.prompt_tokens += result.usage.prompt_tokens
            usage.completion_tokens += result.usage.completion_tokens
        return _envelope(response_id, parsed, COMPLETION, choices, _usage(usage))

    def _completion_chunk(self, response_id: str, parsed: Prompted, index: int,
                          chunk: serving_pb2.GenerateStreamResponse, first: bool) -> list[dict[str, Any]]:
        choice = {"index": index, "text": chunk.text, "finish_reason": chunk.finish_reason or None,
                  "logprobs": self._completion_logprobs(chunk) if parsed.logprobs else None}
        return [_envelope(response_id, parsed, COMPLETION, [choice], None)]

    def _completion_logprobs(self, result: serving_pb2.GenerateResponse | serving_pb2.GenerateStreamResponse
                             ) -> dict[str, Any]:
        return {"tokens": self._service.token_strings(list(result.token_ids)), "token_logprobs": list(result.logprobs),
                "top_logprobs": None}

    def _chat_logprobs(self, token_ids, logprobs) -> dict[str, Any]:
        tokens = self._service.token_strings(list(token_ids))
        return {"content": [{"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}
                            for token, logprob in zip(tokens, logprobs)]}


# Request parsing --------------------------------------------------------------------------

async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError.invalid("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError.invalid("the request body must be a JSON object")
    return body


def _request_id(request: web.Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


def _optional(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    valid = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        valid = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not valid:
        kind_name = getattr(kind, "__name__", str(kind))
        raise ApiError.invalid(f"`{name}` must be of type {kind_name}, got {json.dumps(value)}", name)
    return value


def _prompts(prompt: Any) -> list[str | list[int]]:
    """A string, a list of token ids, or a list of either (one choice per prompt)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(_is_token_id(t) for t in p)) for p in prompt):
        return prompt
    raise ApiError.invalid("`prompt` must be a string, a list of token ids, or a non-empty list of either",
                           "prompt")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError.invalid("`messages` must be a non-empty list", "messages")
    parsed = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError.invalid("each message must be an object with a string `role`", "messages")
        parsed.append({"role": message["role"], "content": _message_text(message.get("content"))})
    return parsed


def _message_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError.invalid("message content must be a string or a list of text parts", "messages")


def _refuse_unsupported(body: dict[str, Any], **allowed: Any) -> None:
    """Parameters this server cannot honour are refused, not silently ignored."""
    if _optional(body, "n", int, 1) != 1:
        raise ApiError.invalid("only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        if _optional(body, name, float, 0.0) != 0.0 and not (name == "repetition_penalty" and body[name] == 1):
            raise ApiError.invalid(f"`{name}` is not supported", name)
    if body.get("logit_bias"):
        raise ApiError.invalid("`logit_bias` is not supported", "logit_bias")
    for name, default in allowed.items():
        if body.get(name) not in (None, default):
            raise ApiError.invalid(f"`{name}` is not supported (only {json.dumps(default)})", name)


def _sampling(body: dict[str, Any], max_tokens: int | None, max_tokens_param: str,
              logprobs: bool) -> serving_pb2.SamplingParams:
    sampling = serving_pb2.SamplingParams(
        temperature=_optional(body, "temperature", float, DEFAULT_TEMPERATURE),
        top_p=_optional(body, "top_p", float, 1.0), top_k=_optional(body, "top_k", int, -1),
        ignore_eos=_optional(body, "ignore_eos", bool, False), logprobs=logprobs,
    )
    if max_tokens is not None:
        if max_tokens < 1:
            raise ApiError.invalid(f"`{max_tokens_param}` must be at least 1", max_tokens_param)
        sampling.max_new_tokens = max_tokens
    seed = _optional(body, "seed", int)
    if seed is not None:
        sampling.seed = seed % (1 << 64)
    stop = _optional(body, "stop", str | list, [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise ApiError.invalid("`stop` must be a string or a list of strings", "stop")
    sampling.stop.extend(stop)
    stop_token_ids = _optional(body, "stop_token_ids", list, [])
    if not all(_is_token_id(t) for t in stop_token_ids):
        raise ApiError.invalid("`stop_token_ids` must be a list of token ids", "stop_token_ids")
    sampling.stop_token_ids.extend(stop_token_ids)
    return sampling


# Responses --------------------------------------------------------------------------------

def _model_card(model_id: str, created: int, root: str, parent: str | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "loraserve", "root": root,
            "parent": parent}


def _usage(usage: serving_pb2.Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _envelope(response_id: str, parsed: Prompted, kind: str, choices: list[dict], usage: dict | None) -> dict:
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": parsed.model,
            "choices": choices, "usage": usage}


async def _send_event(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(event)}\n\n".encode())


async def _merged(generators: list[GenerationStream]) -> Chunks:
    """Runs the generators concurrently; yields (index, message) as they come, raises the first error."""
    queue: asyncio.Queue[tuple[int, serving_pb2.GenerateStreamResponse | None, Exception | None]] = asyncio.Queue()

    async def pump(index: int, generator: GenerationStream) -> None:
        try:
            async with aclosing(generator) as messages:
                async for message in messages:
                    await queue.put((index, message, None))
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, error))
            return
        await queue.put((index, None, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generators)]
    try:
        running = len(tasks)
        while running:
            index, message, error = await queue.get()
            if error is not None:
                raise error
            if message is None:
                running -= 1
            else:
                yield index, message
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
