"""What every API (gRPC, HTTP) does for a request, independent of the transport.

The service validates requests against the model's limits, tokenizes them, submits them
to the scheduler through the `SchedulerLink`, and turns the token stream that comes back
into text (incremental detokenization, stop strings). It also forwards adapter
operations and stats. Expected failures raise `ServiceError`s (a transport-neutral status
and a message), which each API maps to its own statuses.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from frontend.errors import error_code
from frontend.generation import OutputAssembler
from frontend.metrics import FrontendMetrics
from frontend.scheduler_link import SchedulerFailure, SchedulerLink, SchedulerUnavailable
from frontend.tokenizer import PromptTokenizer
from frontend.validation import (
    Field,
    InvalidRequest,
    ModelLimits,
    check_prompt,
    check_request,
    no_tokenizer,
    resolve_sampling,
)
from protos.loraserve.v1 import internal_pb2, serving_pb2

log = logging.getLogger("loraserve.frontend")
GenerationStream = AsyncIterator[serving_pb2.GenerateStreamResponse]


@dataclass(frozen=True)
class ServiceSettings:
    model_name: str | None  # reported as ServerInfo.model instead of the scheduler's model path
    admin_timeout_s: float
    load_adapter_timeout_s: float  # the worker validates the adapter's files first
    stop_ack_timeout_s: float  # wait for the scheduler's timing after aborting at a stop string
    metrics_timeout_s: float  # a scrape waits this long for the scheduler's figures


class GenerationService:
    """One per frontend, shared by its APIs.

    Generation is refused (UNAVAILABLE) until `fetch_server_info` has given the model's limits.
    """

    def __init__(self, link: SchedulerLink, tokenizer: PromptTokenizer | None, settings: ServiceSettings,
                 metrics: FrontendMetrics) -> None:
        self._link = link
        self._tokenizer = tokenizer
        self._settings = settings
        self._metrics = metrics
        self._server_info: serving_pb2.ServerInfo | None = None  # set once the scheduler has answered
        self.draining = False  # shutting down: new requests are refused, in-flight ones finish

    def refuse_while_draining(self) -> None:
        """UNAVAILABLE while shutting down (generation checks it; the gRPC API, for every RPC)."""
        if self.draining:
            raise SchedulerUnavailable("the server is shutting down; retry on another replica or later")

    def check_serving(self) -> None:
        """UNAVAILABLE, saying why, unless generation requests are taken now."""
        self.refuse_while_draining()
        self._limits()

    # Generation ---------------------------------------------------------------------------

    async def generate(self, request: serving_pb2.GenerateRequest) -> GenerationStream:
        """The generation path of every API: `_generate`, measured and logged.

        A request without an id gets one. Close the generator (aclosing) to cancel the request.
        """
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        fields = {"request_id": request.request_id, "adapter": request.adapter}
        log.debug("request received", extra=fields)
        tracker = self._metrics.track(request.adapter)
        outcome = "cancelled"  # unless it finishes or fails below: the client left or it was cancelled
        try:
            async with aclosing(self._generate(request)) as chunks:
                async for chunk in chunks:
                    tracker.on_chunk(chunk)
                    if chunk.finished:
                        outcome = chunk.finish_reason
                        fields |= {"prompt_tokens": chunk.usage.prompt_tokens,
                                   "completion_tokens": chunk.usage.completion_tokens}
                    yield chunk
        except Exception as error:
            outcome = error_code(error).name.lower()
            fields["error"] = str(error)
            raise
        finally:
            e2e_s = tracker.finish(outcome)
            log.info("request finished", extra=fields | {"outcome": outcome, "e2e_ms": round(e2e_s * 1e3, 2)})

    async def _generate(self, request: serving_pb2.GenerateRequest) -> GenerationStream:
        """Validates, submits and streams one request; aborts it at the scheduler if left early."""
        self.refuse_while_draining()
        limits = self._limits()
        check_request(request, limits, has_tokenizer=self._tokenizer is not None)
        prompt_ids = list(request.input_ids) or await self._tokenizer.encode(request.text)
        check_prompt(prompt_ids, request.sampling, limits)
        request_id = request.request_id
        submit = internal_pb2.SubmitRequest(
            request_id=request_id, input_ids=prompt_ids, adapter=request.adapter,
            sampling=resolve_sampling(request.sampling, len(prompt_ids), limits))
        assembler = OutputAssembler(request_id, prompt_ids, self._tokenizer, request.sampling.stop)
        outputs = self._link.open_stream(request_id)
        scheduler_done = False
        try:
            self._link.submit(submit)
            while not assembler.finished:
                output = await outputs.get()
                scheduler_done = output.finished
                if output.HasField("error"):
                    raise SchedulerFailure(output.error)
                chunk = assembler.add(output)
                if assembler.stopped_by_string and not scheduler_done:
                    self._link.abort(request_id)
                    scheduler_done = True
                    await self._take_closing_timing(outputs, chunk)
                yield chunk
        finally:
            self._link.close_stream(request_id)
            if not scheduler_done:  # cancelled, deadline passed, client gone or failed mid-way
                self._link.abort(request_id)

    async def _take_closing_timing(self, outputs: asyncio.Queue[internal_pb2.RequestOutput],
                                   chunk: serving_pb2.GenerateStreamResponse) -> None:
        """After an abort the scheduler's closing output carries the request's timing; wait briefly for it."""
        try:
            output = await asyncio.wait_for(_closing_output(outputs), self._settings.stop_ack_timeout_s)
        except asyncio.TimeoutError:
            log.debug("no closing output for %s after its abort; its timing stays empty", chunk.request_id)
            return
        if output.HasField("timing"):
            chunk.timing.CopyFrom(output.timing)

    def _limits(self) -> ModelLimits:
        if self._server_info is None:
            raise SchedulerUnavailable("the scheduler is not ready (starting, or reconnecting after it was lost); "
                                       "retry shortly")
        return ModelLimits.from_server_info(self._server_info)

    # Tokenizer ----------------------------------------------------------------------------

    async def tokenize(self, text: str) -> serving_pb2.TokenizeResponse:
        if self._tokenizer is None:
            raise no_tokenizer()
        input_ids = await self._tokenizer.encode(text)
        return serving_pb2.TokenizeResponse(input_ids=input_ids, tokens=self._tokenizer.token_strings(input_ids))

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation's prompt through the tokenizer's chat template."""
        if self._tokenizer is None:
            raise no_tokenizer()
        try:
            return await self._tokenizer.encode_chat(messages)
        except ValueError as error:  # no chat template
            raise InvalidRequest(str(error), Field.PROMPT) from None

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """The tokens as the tokenizer writes them; without a tokenizer, their ids."""
        if self._tokenizer is None:
            return [str(t) for t in token_ids]
        return self._tokenizer.token_strings(token_ids)

    # Adapters -----------------------------------------------------------------------------

    async def load_adapter(self, request: serving_pb2.LoadAdapterRequest) -> serving_pb2.LoadAdapterResponse:
        admin = internal_pb2.AdminRequest(load_adapter=request)
        return (await self._link.admin(admin, self._settings.load_adapter_timeout_s)).load_adapter

    async def unload_adapter(self, request: serving_pb2.UnloadAdapterRequest) -> serving_pb2.UnloadAdapterResponse:
        # The scheduler answers once the adapter's running requests have finished, which may
        # take any time: no fixed timeout (the client's deadline and the liveness check apply).
        admin = internal_pb2.AdminRequest(unload_adapter=request)
        return (await self._link.admin(admin, None)).unload_adapter

    async def list_adapters(self) -> serving_pb2.ListAdaptersResponse:
        admin = internal_pb2.AdminRequest(list_adapters=serving_pb2.ListAdaptersRequest())
        return (await self._link.admin(admin, self._settings.admin_timeout_s)).list_adapters

    # Server information -------------------------------------------------------------------

    @property
    def server_info(self) -> serving_pb2.ServerInfo | None:
        """The scheduler's last answer to `fetch_server_info`; None until then or once it was lost."""
        return self._server_info

    def forget_server_info(self) -> None:
        """The scheduler was lost; a new one may have other limits, so requests wait for its answer."""
        self._server_info = None

    async def fetch_server_info(self, timeout_s: float | None = None) -> serving_pb2.ServerInfo:
        """Asks the scheduler, keeps the answer for validation, and names the model as configured."""
        admin = internal_pb2.AdminRequest(server_info=serving_pb2.GetServerInfoRequest())
        info = (await self._link.admin(admin, timeout_s or self._settings.admin_timeout_s)).server_info
        if self._settings.model_name:
            info.model = self._settings.model_name
        self._server_info = info
        return info

    async def stats(self, request: serving_pb2.GetStatsRequest) -> serving_pb2.ServerStats:
        admin = internal_pb2.AdminRequest(stats=request)
        return (await self._link.admin(admin, self._settings.admin_timeout_s)).stats

    async def timeline(self, request: serving_pb2.GetTimelineRequest) -> serving_pb2.Timeline:
        admin = internal_pb2.AdminRequest(timeline=request)
        return (await self._link.admin(admin, self._settings.load_adapter_timeout_s)).timeline

    async def scheduler_figures(self) -> internal_pb2.MetricsSnapshot | None:
        """The scheduler's figures for a metrics scrape; None if it does not answer."""
        admin = internal_pb2.AdminRequest(metrics=internal_pb2.MetricsRequest())
        try:
            return (await self._link.admin(admin, self._settings.metrics_timeout_s)).metrics
        except (SchedulerUnavailable, SchedulerFailure) as error:
            log.debug("no scheduler figures for this scrape: %s", error)
            return None


async def _closing_output(outputs: asyncio.Queue[internal_pb2.RequestOutput]) -> internal_pb2.RequestOutput:
    output = await outputs.get()
    while not output.finished:
        output = await outputs.get()
    return output
