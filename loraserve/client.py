"""A small synchronous client for loraserve's gRPC API.

    with LoraServeClient("127.0.0.1:50051", timeout=30) as client:
        client.wait_until_ready(60)
        print(client.generate("Hello", adapter="sql", max_new_tokens=32).text)
        for message in client.generate_stream(input_ids=[1, 2, 3], temperature=0.7, seed=1):
            print(message.text, end="")

Sampling keyword arguments are the fields of `SamplingParams` (max_new_tokens, temperature,
top_p, top_k, seed, stop, stop_token_ids, ignore_eos, logprobs). Errors are raised as
`grpc.RpcError`, whose `code()` says what went wrong.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.loraserve.v1 import serving_pb2, serving_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
READY_POLL_S = 0.1


class GenerateStream(Iterator[serving_pb2.GenerateStreamResponse], Protocol):
    """The messages of one streamed generation; `cancel()` stops it (the server frees its resources)."""

    def cancel(self) -> bool: ...


@dataclass(frozen=True)
class Connection:
    """Where and how to reach a server: its address, the bearer token it needs, TLS credentials."""

    address: str = "127.0.0.1:50051"
    token: str | None = None
    tls: grpc.ChannelCredentials | None = None

    def client(self, timeout: float | None = None) -> LoraServeClient:
        return LoraServeClient(self.address, timeout=timeout, token=self.token, tls=self.tls)

    def aio_channel(self) -> grpc.aio.Channel:
        """An asyncio channel; its calls need `metadata()` for the token."""
        if self.tls is None:
            return grpc.aio.insecure_channel(self.address)
        return grpc.aio.secure_channel(self.address, self.tls)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.token)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


class LoraServeClient:
    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, token: str | None = None,
                 tls: grpc.ChannelCredentials | None = None) -> None:
        """`timeout` (seconds) is every call's default deadline; None waits as long as needed.

        `token` is sent as `authorization: Bearer <token>` on every call; `tls` (e.g.
        `grpc.ssl_channel_credentials(ca, key, cert)`) makes the channel TLS.
        """
        self.address = address
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        channel = (grpc.insecure_channel(address, options=options) if tls is None
                   else grpc.secure_channel(address, tls, options=options))
        if token is not None:
            channel = grpc.intercept_channel(channel, _BearerToken(token))
        self._channel = channel
        self._stub = serving_pb2_grpc.LoraServingStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, text: str | None = None, *, input_ids: Sequence[int] | None = None, adapter: str = "",
                 request_id: str = "", timeout: float | None = None, **sampling: Any) -> serving_pb2.GenerateResponse:
        request = _generate_request(text, input_ids, adapter, request_id, sampling)
        return self._stub.Generate(request, timeout=self._deadline(timeout))

    def generate_stream(self, text: str | None = None, *, input_ids: Sequence[int] | None = None, adapter: str = "",
                        request_id: str = "", timeout: float | None = None, **sampling: Any) -> GenerateStream:
        """New text and tokens as they are produced; the last message has `finished` set."""
        request = _generate_request(text, input_ids, adapter, request_id, sampling)
        return self._stub.GenerateStream(request, timeout=self._deadline(timeout))

    def load_adapter(self, name: str, path: str, timeout: float | None = None) -> serving_pb2.LoadAdapterResponse:
        request = serving_pb2.LoadAdapterRequest(name=name, path=path)
        return self._stub.LoadAdapter(request, timeout=self._deadline(timeout))

    def unload_adapter(self, name: str, timeout: float | None = None) -> serving_pb2.UnloadAdapterResponse:
        """Returns once the adapter's queued and running requests have finished and it is gone."""
        request = serving_pb2.UnloadAdapterRequest(name=name)
        return self._stub.UnloadAdapter(request, timeout=self._deadline(timeout))

    def list_adapters(self, timeout: float | None = None) -> serving_pb2.ListAdaptersResponse:
        return self._stub.ListAdapters(serving_pb2.ListAdaptersRequest(), timeout=self._deadline(timeout))

    def tokenize(self, text: str, timeout: float | None = None) -> serving_pb2.TokenizeResponse:
        return self._stub.Tokenize(serving_pb2.TokenizeRequest(text=text), timeout=self._deadline(timeout))

    def server_info(self, timeout: float | None = None) -> serving_pb2.ServerInfo:
        return self._stub.GetServerInfo(serving_pb2.GetServerInfoRequest(), timeout=self._deadline(timeout))

    def stats(self, timeout: float | None = None) -> serving_pb2.ServerStats:
        return self._stub.GetStats(serving_pb2.GetStatsRequest(), timeout=self._deadline(timeout))

    def timeline(self, timeout: float | None = None) -> serving_pb2.Timeline:
        """The recent forwards, adapter loads and requests as a Chrome trace (`chrome_trace_json`)."""
        return self._stub.GetTimeline(serving_pb2.GetTimelineRequest(), timeout=self._deadline(timeout))

    def is_ready(self, timeout: float = 1.0) -> bool:
        """True when the server's health check says SERVING within `timeout` seconds."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def wait_until_ready(self, timeout: float) -> None:
        """Blocks until the server is SERVING; raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"loraserve at {self.address} was not ready within {timeout:g} s")
            time.sleep(READY_POLL_S)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LoraServeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


def _generate_request(text: str | None, input_ids: Sequence[int] | None, adapter: str, request_id: str,
                      sampling: dict[str, Any]) -> serving_pb2.GenerateRequest:
    return serving_pb2.GenerateRequest(request_id=request_id, text=text or "", input_ids=list(input_ids or []),
                                       adapter=adapter, sampling=serving_pb2.SamplingParams(**sampling))
