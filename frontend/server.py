"""The public gRPC server: `loraserve.v1.LoraServing`, grpc.health.v1 and server reflection.

The frontend validates and tokenizes requests, forwards them to the scheduler, and turns
the token stream that comes back into text (incremental detokenization, stop strings).
It makes no scheduling decision. Health is NOT_SERVING until the scheduler has answered
a `server_info` request (which also gives the limits requests are validated against),
again whenever the connection to the scheduler drops, and while shutting down.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from frontend.auth import AuthTokens, BearerAuthInterceptor, http_authorizer
from frontend.errors import error_code, status_of
from frontend.generation import OutputAssembler, accumulate
from frontend.malformed import MalformedRequestInterceptor
from frontend.metrics import FrontendMetrics, metrics_application
from frontend.openai_api import Authorize, OpenAIApi
from frontend.scheduler_link import LivenessConfig, SchedulerFailure, SchedulerLink, SchedulerUnavailable
from frontend.tls import TlsFiles, server_credentials
from frontend.tokenizer import PromptTokenizer
from frontend.validation import (
    NO_TOKENIZER,
    InvalidRequest,
    ModelLimits,
    check_prompt,
    check_request,
    resolve_sampling,
)
from protos.loraserve.v1 import internal_pb2, serving_pb2, serving_pb2_grpc
from settings.config import FrontendConfig

log = logging.getLogger("loraserve.frontend")

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["LoraServing"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRAIN_POLL_S = 0.05
REQUEST_ID_METADATA = "x-request-id"


class BindError(OSError):
    """The gRPC server cannot listen on the configured address."""


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def request_id_from(request: serving_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
    """A request id given as `x-request-id` metadata is used when the request has none."""
    if not request.request_id:
        metadata = dict(context.invocation_metadata() or ())
        request.request_id = metadata.get(REQUEST_ID_METADATA, "")


UnaryHandler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _unary_rpc(method: UnaryHandler) -> UnaryHandler:
    """Turns the errors a unary RPC may raise into their gRPC status."""

    @functools.wraps(method)
    async def wrapper(self: LoraServingServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._refuse_while_draining()
            return await method(self, request, context)
        except Exception as error:  # noqa: BLE001 - every error becomes a status, never a crash
            code, details = status_of(error)
        await context.abort(code, details)

    return wrapper


async def _closing_output(outputs: asyncio.Queue[internal_pb2.RequestOutput]) -> internal_pb2.RequestOutput:
    output = await outputs.get()
    while not output.finished:
        output = await outputs.get()
    return output


class LoraServingServicer(serving_pb2_grpc.LoraServingServicer):
    def __init__(self, link: SchedulerLink, tokenizer: PromptTokenizer | None, config: FrontendConfig,
                 metrics: FrontendMetrics) -> None:
        self._link = link
        self._tokenizer = tokenizer
        self._config = config
        self._metrics = metrics
        self.server_info: serving_pb2.ServerInfo | None = None  # set once the scheduler has answered
        self.draining = False  # shutting down: new RPCs are refused, in-flight ones finish

    def _refuse_while_draining(self) -> None:
        if self.draining:
            raise SchedulerUnavailable("the server is shutting down; retry on another replica or later")

    # Generation ---------------------------------------------------------------------------

    @_unary_rpc
    async def Generate(self, request: serving_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> serving_pb2.GenerateResponse:
        request_id_from(request, context)
        response = serving_pb2.GenerateResponse()
        async with aclosing(self.generate(request)) as chunks:
            async for chunk in chunks:
                accumulate(response, chunk)
        return response

    async def GenerateStream(self, request: serving_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[serving_pb2.GenerateStreamResponse]:
        request_id_from(request, context)
        try:
            async with aclosing(self.generate(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        except Exception as error:  # noqa: BLE001 - every error becomes a status, never a crash
            code, details = status_of(error)
        await context.abort(code, details)

    async def generate(self, request: serving_pb2.GenerateRequest) -> AsyncIterator[serving_pb2.GenerateStreamResponse]:
        """The generation path of every API (gRPC and HTTP): `_generate`, measured and logged.

        Errors are raised as the exceptions `status_of` maps; close the generator (aclosing)
        to cancel the request.
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

    async def _generate(self, request: serving_pb2.GenerateRequest) -> AsyncIterator[serving_pb2.GenerateStreamResponse]:
        """Validates, submits and streams one request; aborts it at the scheduler if left early."""
        self._refuse_while_draining()
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
            output = await asyncio.wait_for(_closing_output(outputs), self._config.stop_ack_timeout_s)
        except asyncio.TimeoutError:
            log.debug("no closing output for %s after its abort; its timing stays empty", chunk.request_id)
            return
        if output.HasField("timing"):
            chunk.timing.CopyFrom(output.timing)

    def _limits(self) -> ModelLimits:
        if self.server_info is None:
            raise SchedulerUnavailable("the scheduler is not ready (starting, or reconnecting after it was lost); "
                                       "retry shortly")
        return ModelLimits.from_server_info(self.server_info)

    # Tokenizer ----------------------------------------------------------------------------

    @_unary_rpc
    async def Tokenize(self, request: serving_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> serving_pb2.TokenizeResponse:
        if self._tokenizer is None:
            raise InvalidRequest(NO_TOKENIZER)
        input_ids = await self._tokenizer.encode(request.text)
        return serving_pb2.TokenizeResponse(input_ids=input_ids, tokens=self._tokenizer.token_strings(input_ids))

    # Admin --------------------------------------------------------------------------------

    @_unary_rpc
    async def LoadAdapter(self, request: serving_pb2.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> serving_pb2.LoadAdapterResponse:
        admin = internal_pb2.AdminRequest(load_adapter=request)
        return (await self._link.admin(admin, self._config.load_adapter_timeout_s)).load_adapter

    @_unary_rpc
    async def UnloadAdapter(self, request: serving_pb2.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> serving_pb2.UnloadAdapterResponse:
        # The scheduler answers once the adapter's running requests have finished, which may
        # take any time: no fixed timeout (the client's deadline and the liveness check apply).
        admin = internal_pb2.AdminRequest(unload_adapter=request)
        return (await self._link.admin(admin, None)).unload_adapter

    @_unary_rpc
    async def ListAdapters(self, request: serving_pb2.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> serving_pb2.ListAdaptersResponse:
        return await self.adapters()

    async def adapters(self) -> serving_pb2.ListAdaptersResponse:
        admin = internal_pb2.AdminRequest(list_adapters=serving_pb2.ListAdaptersRequest())
        return (await self._link.admin(admin, self._config.admin_timeout_s)).list_adapters

    @_unary_rpc
    async def GetServerInfo(self, request: serving_pb2.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> serving_pb2.ServerInfo:
        return await self.fetch_server_info()

    @_unary_rpc
    async def GetStats(self, request: serving_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> serving_pb2.ServerStats:
        admin = internal_pb2.AdminRequest(stats=request)
        return (await self._link.admin(admin, self._config.admin_timeout_s)).stats

    @_unary_rpc
    async def GetTimeline(self, request: serving_pb2.GetTimelineRequest,
                          context: grpc.aio.ServicerContext) -> serving_pb2.Timeline:
        admin = internal_pb2.AdminRequest(timeline=request)
        return (await self._link.admin(admin, self._config.load_adapter_timeout_s)).timeline

    async def fetch_server_info(self, timeout_s: float | None = None) -> serving_pb2.ServerInfo:
        """Asks the scheduler, keeps the answer for validation, and names the model as configured."""
        admin = internal_pb2.AdminRequest(server_info=serving_pb2.GetServerInfoRequest())
        info = (await self._link.admin(admin, timeout_s or self._config.admin_timeout_s)).server_info
        if self._config.model_name:
            info.model = self._config.model_name
        self.server_info = info
        return info


class FrontendServer:
    """The frontend in the current event loop: `port = await start()`, later `await stop()`."""

    def __init__(self, config: FrontendConfig, scheduler_address: str, *, ready_file: str | None = None,
                 authorize: Authorize | None = None) -> None:
        """`ready_file` is created once health first turns SERVING (the launcher waits for it).
        `authorize` guards the HTTP API: Authorization header (or None) -> refusal message, or None.

        By default the HTTP API takes the gRPC API's bearer tokens (config's token files), when any are set.
        """
        self.config = config
        self.scheduler_address = scheduler_address
        self.ready_file = ready_file
        self.auth = AuthTokens.from_files(config.auth_token_file, config.admin_token_file)
        self.tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
        if authorize is None and self.auth.enabled:
            authorize = http_authorizer(self.auth)
        self._tokenizer = PromptTokenizer(config.tokenizer_path) if config.tokenizer_path else None
        liveness = LivenessConfig(config.liveness_silence_s, config.liveness_ping_timeout_s,
                                  config.liveness_check_interval_s)
        self._link = SchedulerLink(scheduler_address, liveness, on_disconnect=self._on_scheduler_lost)
        self.metrics = FrontendMetrics()
        self._servicer = LoraServingServicer(self._link, self._tokenizer, config, self.metrics)
        self._http_api = OpenAIApi(self._servicer, self._tokenizer, authorize)
        self._http_runners: list[web.AppRunner] = []
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._readiness: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> int:
        """Binds, starts serving (NOT_SERVING until the scheduler answers) and returns the port."""
        limit = self.config.max_message_bytes
        interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor()]
        if self.auth.enabled:
            interceptors.insert(0, BearerAuthInterceptor(self.auth))
        server = grpc.aio.server(interceptors=interceptors,
                                 options=[("grpc.max_receive_message_length", limit),
                                          ("grpc.max_send_message_length", limit),
                                          ("grpc.so_reuseport", 0)])  # a port in use is an error, not shared
        serving_pb2_grpc.add_LoraServingServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server)
        address = grpc_address(self.config.host, self.config.port)
        try:
            if self.tls is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, server_credentials(self.tls))
        except RuntimeError as error:
            raise BindError(f"cannot listen on {address}: {error}") from None
        await self._set_health(NOT_SERVING)
        await self._link.start()
        await self._start_http()
        await server.start()
        self._server = server
        self._readiness = asyncio.create_task(self._become_ready())
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains: NOT_SERVING and new RPCs UNAVAILABLE while in-flight ones finish within the grace period.

        Health keeps answering (NOT_SERVING) during the drain; what is left at its end is cancelled.
        """
        self._stopping = True
        self._servicer.draining = True
        await self._health.enter_graceful_shutdown()
        if self._readiness is not None:
            self._readiness.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.grace_seconds if grace_s is None else grace_s)
        http_stopped = asyncio.gather(*(runner.shutdown() for runner in self._http_runners))
        while self._link.in_flight and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self._server is not None:
            await self._server.stop(max(0.0, deadline - loop.time()))
        await asyncio.wait_for(http_stopped, max(0.0, deadline - loop.time()) + 1)
        for runner in self._http_runners:
            await runner.cleanup()
        await self._link.close()  # after the server: cancelled RPCs still send their aborts
        if self._tokenizer is not None:
            self._tokenizer.close()

    async def _start_http(self) -> None:
        if self.config.http_port is not None:
            self.http_port = await self._serve_http(self._http_api.application(), self.config.http_port)
        if self.config.metrics_port is not None:
            app = metrics_application(self.metrics, self._scheduler_metrics)
            self.metrics_port = await self._serve_http(app, self.config.metrics_port)

    async def _serve_http(self, app: web.Application, port: int) -> int:
        """Serves `app` on the configured host; returns the port (handlers are cancelled if the client leaves)."""
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.config.host, port).start()
        except OSError as error:
            await runner.cleanup()
            raise BindError(f"cannot listen on {grpc_address(self.config.host, port)}: {error}") from None
        self._http_runners.append(runner)
        return runner.addresses[-1][1]

    async def _scheduler_metrics(self) -> internal_pb2.MetricsSnapshot | None:
        admin = internal_pb2.AdminRequest(metrics=internal_pb2.MetricsRequest())
        try:
            return (await self._link.admin(admin, self.config.metrics_timeout_s)).metrics
        except (SchedulerUnavailable, SchedulerFailure) as error:
            log.debug("no scheduler figures for this scrape: %s", error)
            return None

    async def _become_ready(self) -> None:
        await self._set_health(NOT_SERVING)
        for attempt in itertools.count():
            try:
                info = await self._servicer.fetch_server_info(self.config.readiness_probe_timeout_s)
            except (SchedulerUnavailable, SchedulerFailure) as error:
                log.log(logging.INFO if attempt == 0 else logging.DEBUG, "waiting for the scheduler at %s: %s",
                        self.scheduler_address, error)
                await asyncio.sleep(self.config.readiness_retry_s)
                continue
            log.info("scheduler ready: %s (%s, %s, context %d)", info.model, info.architecture, info.device,
                     info.max_context_length)
            await self._set_health(SERVING)
            if self.ready_file:
                Path(self.ready_file).touch()
            return

    def _on_scheduler_lost(self) -> None:
        """NOT_SERVING until a scheduler answers again (a new one may have other limits)."""
        if self._stopping:
            return
        self._servicer.server_info = None
        if self._readiness is not None:
            self._readiness.cancel()
        self._readiness = asyncio.create_task(self._become_ready())

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)


async def serve(config: FrontendConfig, scheduler_address: str, *, ready_file: str | None = None) -> None:
    """Runs the frontend until SIGTERM or SIGINT, then stops it gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    frontend = FrontendServer(config, scheduler_address, ready_file=ready_file)
    port = await frontend.start()
    print(f"frontend listening on {grpc_address(config.host, port)}", flush=True)
    for name, http_port in (("OpenAI-compatible HTTP API", frontend.http_port), ("metrics", frontend.metrics_port)):
        if http_port is not None:
            print(f"frontend {name} on http://{grpc_address(config.host, http_port)}", flush=True)
    await stop.wait()
    log.info("stopping (grace period %g s)", config.grace_seconds)
    await frontend.stop()
