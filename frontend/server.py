"""The frontend's assembly: the public gRPC server, the HTTP servers, health and draining.

The gRPC API (`grpc_api`, with grpc.health.v1 and server reflection) and the
OpenAI-compatible HTTP API (`openai_api`) are adapters over one `GenerationService`,
which validates, tokenizes and forwards requests to the scheduler; the frontend makes no
scheduling decision. Health is NOT_SERVING until the scheduler has answered a
`server_info` request (which also gives the limits requests are validated against),
again whenever the connection to the scheduler drops, and while shutting down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from frontend.auth import AuthTokens, BearerAuthInterceptor, http_authorizer
from frontend.generation_service import GenerationService, ServiceSettings
from frontend.grpc_api import LoraServingServicer
from frontend.malformed import MalformedRequestInterceptor
from frontend.metrics import FrontendMetrics, metrics_application
from frontend.openai_api import Authorize, OpenAIApi
from frontend.replicas import ReplicaSet, ReplicaSettings
from frontend.routing import RoutingConfig
from frontend.scheduler_link import LivenessConfig
from frontend.tls import TlsFiles, server_credentials
from frontend.tokenizer import PromptTokenizer
from protos.loraserve.v1 import serving_pb2, serving_pb2_grpc
from settings.config import FrontendConfig
from settings.logs import announce

log = logging.getLogger("loraserve.frontend")

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["LoraServing"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRAIN_POLL_S = 0.05
ENDING_S = 2.0  # after the grace period: for the APIs to send each request its end


class BindError(OSError):
    """The gRPC server cannot listen on the configured address."""


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _replica_settings(config: FrontendConfig) -> ReplicaSettings:
    liveness = LivenessConfig(config.liveness_silence_s, config.liveness_ping_timeout_s,
                              config.liveness_check_interval_s)
    routing = RoutingConfig(load_bound=config.routing_load_bound, min_bound=config.routing_min_bound,
                            requests_per_replica=config.routing_requests_per_replica,
                            spread_interval_s=config.routing_spread_interval_s, policy=config.routing_policy)
    return ReplicaSettings(liveness=liveness, routing=routing, state_interval_s=config.replica_state_interval_s,
                           readiness_probe_timeout_s=config.readiness_probe_timeout_s,
                           readiness_retry_s=config.readiness_retry_s, admin_timeout_s=config.admin_timeout_s,
                           load_adapter_timeout_s=config.load_adapter_timeout_s)


def _service_settings(config: FrontendConfig) -> ServiceSettings:
    return ServiceSettings(model_name=config.model_name, admin_timeout_s=config.admin_timeout_s,
                           load_adapter_timeout_s=config.load_adapter_timeout_s,
                           stop_ack_timeout_s=config.stop_ack_timeout_s, metrics_timeout_s=config.metrics_timeout_s)


class FrontendServer:
    """The frontend in the current event loop: `port = await start()`, later `await stop()`."""

    def __init__(self, config: FrontendConfig, scheduler_addresses: Sequence[str] | str, *,
                 ready_file: str | None = None, authorize: Authorize | None = None) -> None:
        """`scheduler_addresses`: one per replica (frontend/replicas.py).
        `ready_file` is created once health first turns SERVING (the launcher waits for it).
        `authorize` guards the HTTP API: Authorization header (or None) -> refusal message, or None.

        By default the HTTP API takes the gRPC API's bearer tokens (config's token files), when any are set.
        """
        self.config = config
        addresses = [scheduler_addresses] if isinstance(scheduler_addresses, str) else list(scheduler_addresses)
        self.ready_file = ready_file
        self.auth = AuthTokens.from_files(config.auth_token_file, config.admin_token_file)
        self.tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
        if authorize is None and self.auth.enabled:
            authorize = http_authorizer(self.auth)
        self._tokenizer = PromptTokenizer(config.tokenizer_path) if config.tokenizer_path else None
        self._replicas = ReplicaSet(addresses, _replica_settings(config), on_serving_changed=self._on_serving_changed)
        self.metrics = FrontendMetrics()
        self._service = GenerationService(self._replicas, self._tokenizer, _service_settings(config), self.metrics)
        self._http_api = OpenAIApi(self._service, authorize)
        self._http_runners: list[web.AppRunner] = []
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._health_updates: set[asyncio.Task[None]] = set()
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
        serving_pb2_grpc.add_LoraServingServicer_to_server(LoraServingServicer(self._service), server)
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
        await self._replicas.start()
        await self._start_http()
        await server.start()
        self._server = server
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains: NOT_SERVING and new requests UNAVAILABLE while in-flight ones finish within the grace period.

        What is still running when the grace period ends gets a proper end rather than a cut
        connection: UNAVAILABLE saying the server is shutting down (gRPC status; HTTP 503, or
        an error event and `[DONE]` on a stream), logged like every finished request.
        """
        self._stopping = True
        self._service.draining = True
        await self._health.enter_graceful_shutdown()
        grace = self.config.grace_seconds if grace_s is None else grace_s
        await self._wait_for_in_flight(grace)
        if self._replicas.in_flight:
            log.warning("the grace period of %g s ended with %d requests in flight: ending them", grace,
                        self._replicas.in_flight)
            self._replicas.fail_all(f"the server is shutting down: its grace period of {grace:g} s ended "
                                "before this request finished; retry on another replica or later")
            await self._wait_for_in_flight(ENDING_S)
        if self._server is not None:
            await self._server.stop(ENDING_S)
        for runner in self._http_runners:
            await runner.cleanup()  # waits up to ENDING_S for handlers still writing their ends
        await self._replicas.close()  # after the servers: cancelled RPCs still send their aborts
        if self._tokenizer is not None:
            self._tokenizer.close()

    async def _wait_for_in_flight(self, timeout_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._replicas.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)

    async def _start_http(self) -> None:
        if self.config.http_port is not None:
            self.http_port = await self._serve_http(self._http_api.application(), self.config.http_port)
        if self.config.metrics_port is not None:
            app = metrics_application(self.metrics, self._service.scheduler_figures)
            self.metrics_port = await self._serve_http(app, self.config.metrics_port)

    async def _serve_http(self, app: web.Application, port: int) -> int:
        """Serves `app` on the configured host; returns the port (handlers are cancelled if the client leaves)."""
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=ENDING_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.config.host, port).start()
        except OSError as error:
            await runner.cleanup()
            raise BindError(f"cannot listen on {grpc_address(self.config.host, port)}: {error}") from None
        self._http_runners.append(runner)
        return runner.addresses[-1][1]

    def _on_serving_changed(self, serving: bool) -> None:
        """SERVING while any replica takes requests (the ready file marks the first time)."""
        if self._stopping:
            return
        task = asyncio.create_task(self._set_health(SERVING if serving else NOT_SERVING))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)
        if serving and self.ready_file:
            Path(self.ready_file).touch()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)


async def serve(config: FrontendConfig, scheduler_addresses: Sequence[str], *, ready_file: str | None = None) -> None:
    """Runs the frontend until SIGTERM or SIGINT, then stops it gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    frontend = FrontendServer(config, scheduler_addresses, ready_file=ready_file)
    port = await frontend.start()
    announce(log, f"frontend listening on {grpc_address(config.host, port)}", api="grpc", port=port)
    for name, api, http_port in (("OpenAI-compatible HTTP API", "http", frontend.http_port),
                                 ("metrics", "metrics", frontend.metrics_port)):
        if http_port is not None:
            announce(log, f"frontend {name} on http://{grpc_address(config.host, http_port)}", api=api, port=http_port)
    await stop.wait()
    log.info("stopping (grace period %g s)", config.grace_seconds)
    await frontend.stop()
