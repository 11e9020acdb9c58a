"""What every API (gRPC, HTTP) does for a request, independent of the transport.

The service validates requests against the model's limits, tokenizes them, submits them
to the scheduler through the `SchedulerLink`, and turns the token stream that comes back
into text (incremental detokenization, stop strings). It also forwards adapter
operations and stats. Expected failures raise `ServiceError`s (a transport-neutral status
and a message), which each API maps to its own statuses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from frontend.errors import StatusCode, error_code
from frontend.generation import OutputAssembler
from frontend.metrics import FrontendMetrics
from frontend.replicas import NO_REPLICA_READY, Replica, ReplicaSet
from frontend.scheduler_link import SchedulerFailure, SchedulerUnavailable
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

    Generation is refused (UNAVAILABLE) until a replica is ready, which gives the model's limits.
    """

    def __init__(self, replicas: ReplicaSet, tokenizer: PromptTokenizer | None, settings: ServiceSettings,
                 metrics: FrontendMetrics) -> None:
        self._replicas = replicas
        self._tokenizer = tokenizer
        self._settings = settings
        self._metrics = metrics
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
        """Validates, then streams the request from the replica the router chose.

        A replica that fails the request UNAVAILABLE before its first token (its scheduler or
        worker lost) is taken out of routing and the request goes to another replica (its client
        sees nothing of it); after the first token, it ends UNAVAILABLE.
        """
        self.refuse_while_draining()
        limits = self._limits()
        check_request(request, limits, has_tokenizer=self._tokenizer is not None)
        prompt_ids = list(request.input_ids) or await self._tokenizer.encode(request.text)
        check_prompt(prompt_ids, request.sampling, limits)
        submit = internal_pb2.SubmitRequest(
            request_id=request.request_id, input_ids=prompt_ids, adapter=request.adapter,
            sampling=resolve_sampling(request.sampling, len(prompt_ids), limits))
        for attempt in itertools.count(1):
            replica = self._replicas.route(request.adapter)
            assembler = OutputAssembler(request.request_id, prompt_ids, self._tokenizer, request.sampling.stop)
            sent = False
            try:
                async for chunk in self._stream_from(replica, submit, assembler):
                    sent = True
                    yield chunk
                return
            except SchedulerFailure as error:
                if sent or not self._may_retry(error, attempt):
                    raise
                self._replicas.take_out(replica, str(error))
                log.info("replica %s failed the request before its first token (%s): retrying on another",
                         replica.name, error, extra={"request_id": request.request_id, "replica": replica.name})
            finally:
                self._replicas.finished(request.adapter)

    def _may_retry(self, error: SchedulerFailure, attempt: int) -> bool:
        """Its replica could not run it (lost, or its worker gone), another may, and not shutting down."""
        return (error.code is StatusCode.UNAVAILABLE and not self.draining
                and attempt < len(self._replicas.replicas))

    async def _stream_from(self, replica: Replica, submit: internal_pb2.SubmitRequest,
                           assembler: OutputAssembler) -> GenerationStream:
        """Submits to one replica and streams its outputs; aborts the request there if left early."""
        link, request_id = replica.link, submit.request_id
        outputs = link.open_stream(request_id)
        scheduler_done = False
        try:
            link.submit(submit)
            while not assembler.finished:
                output = await outputs.get()
                scheduler_done = output.finished
                if output.HasField("error"):
                    raise SchedulerFailure(output.error)
                chunk = assembler.add(output)
                if assembler.stopped_by_string and not scheduler_done:
                    link.abort(request_id)
                    scheduler_done = True
                    await self._take_closing_timing(outputs, chunk)
                yield chunk
        finally:
            link.close_stream(request_id)
            if not scheduler_done:  # cancelled, deadline passed, client gone or failed mid-way
                link.abort(request_id)

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
        info = self._replicas.server_info
        if info is None:
            raise SchedulerUnavailable(NO_REPLICA_READY)
        return ModelLimits.from_server_info(info)

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
        return await self._replicas.load_adapter(request)

    async def unload_adapter(self, request: serving_pb2.UnloadAdapterRequest) -> serving_pb2.UnloadAdapterResponse:
        return await self._replicas.unload_adapter(request)

    async def list_adapters(self) -> serving_pb2.ListAdaptersResponse:
        return await self._replicas.list_adapters()

    # Server information -------------------------------------------------------------------

    @property
    def server_info(self) -> serving_pb2.ServerInfo | None:
        """A ready replica's limits and identity, the model named as configured; None while none is ready."""
        return self._named(self._replicas.server_info)

    async def fetch_server_info(self, timeout_s: float | None = None) -> serving_pb2.ServerInfo:
        """Asks a ready replica now (GetServerInfo)."""
        return self._named(await self._replicas.server_info_now(timeout_s or self._settings.admin_timeout_s))

    def _named(self, info: serving_pb2.ServerInfo | None) -> serving_pb2.ServerInfo | None:
        if info is not None and self._settings.model_name:
            info.model = self._settings.model_name
        return info

    async def stats(self, request: serving_pb2.GetStatsRequest) -> serving_pb2.ServerStats:
        return await self._replicas.stats(request)

    async def timeline(self, request: serving_pb2.GetTimelineRequest) -> serving_pb2.Timeline:
        return await self._replicas.timeline(request)

    async def scheduler_figures(self) -> dict[str, internal_pb2.MetricsSnapshot | None]:
        """Each replica's figures for a metrics scrape; None for one that does not answer."""
        return await self._replicas.figures(self._settings.metrics_timeout_s)


async def _closing_output(outputs: asyncio.Queue[internal_pb2.RequestOutput]) -> internal_pb2.RequestOutput:
    output = await outputs.get()
    while not output.finished:
        output = await outputs.get()
    return output
