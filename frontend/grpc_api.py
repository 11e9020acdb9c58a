"""`loraserve.v1.LoraServing`: the gRPC API, a thin adapter over the `GenerationService`.

Every RPC is refused with UNAVAILABLE while the frontend drains; errors become gRPC
statuses of the same name as their transport-neutral code.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc

from frontend.errors import ServiceError, as_service_error
from frontend.generation import accumulate
from frontend.generation_service import GenerationService, GenerationStream
from protos.loraserve.v1 import serving_pb2, serving_pb2_grpc

REQUEST_ID_METADATA = "x-request-id"


def grpc_code(error: ServiceError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code.name]


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
            self._service.refuse_while_draining()
            return await method(self, request, context)
        except Exception as error:  # noqa: BLE001 - every error becomes a status, never a crash
            failure = as_service_error(error)
        await context.abort(grpc_code(failure), failure.message)

    return wrapper


class LoraServingServicer(serving_pb2_grpc.LoraServingServicer):
    def __init__(self, service: GenerationService) -> None:
        self._service = service

    @_unary_rpc
    async def Generate(self, request: serving_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> serving_pb2.GenerateResponse:
        request_id_from(request, context)
        response = serving_pb2.GenerateResponse()
        async with aclosing(self._service.generate(request)) as chunks:
            async for chunk in chunks:
                accumulate(response, chunk)
        return response

    async def GenerateStream(self, request: serving_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> GenerationStream:
        request_id_from(request, context)
        try:
            async with aclosing(self._service.generate(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        except Exception as error:  # noqa: BLE001 - every error becomes a status, never a crash
            failure = as_service_error(error)
        await context.abort(grpc_code(failure), failure.message)

    @_unary_rpc
    async def Tokenize(self, request: serving_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> serving_pb2.TokenizeResponse:
        return await self._service.tokenize(request.text)

    @_unary_rpc
    async def LoadAdapter(self, request: serving_pb2.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> serving_pb2.LoadAdapterResponse:
        return await self._service.load_adapter(request)

    @_unary_rpc
    async def UnloadAdapter(self, request: serving_pb2.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> serving_pb2.UnloadAdapterResponse:
        return await self._service.unload_adapter(request)

    @_unary_rpc
    async def ListAdapters(self, request: serving_pb2.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> serving_pb2.ListAdaptersResponse:
        return await self._service.list_adapters()

    @_unary_rpc
    async def GetServerInfo(self, request: serving_pb2.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> serving_pb2.ServerInfo:
        return await self._service.fetch_server_info()

    @_unary_rpc
    async def GetStats(self, request: serving_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> serving_pb2.ServerStats:
        return await self._service.stats(request)

    @_unary_rpc
    async def GetTimeline(self, request: serving_pb2.GetTimelineRequest,
                          context: grpc.aio.ServicerContext) -> serving_pb2.Timeline:
        return await self._service.timeline(request)
