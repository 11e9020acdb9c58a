"""Optional bearer-token authentication for the public API.

Two tokens, both optional: the API token opens every RPC but health (which load
balancers probe without credentials); the admin token opens LoadAdapter/UnloadAdapter
and, as a superset, everything else. With only an API token set, the admin RPCs take
the API token too. Missing or unknown credentials are UNAUTHENTICATED; the API token on
an admin RPC is PERMISSION_DENIED.

`check_bearer` is the whole decision, free of gRPC, so an HTTP front end can reuse it
with the value of its `Authorization` header (`AuthDenied.http_status`).
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import grpc

from protos.loraserve.v1 import serving_pb2

_SERVICE = serving_pb2.DESCRIPTOR.services_by_name["LoraServing"].full_name
ADMIN_METHODS = frozenset(f"/{_SERVICE}/{name}" for name in ("LoadAdapter", "UnloadAdapter"))
OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"
BEARER_PREFIX = "bearer "


class Denial(enum.Enum):
    UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, 401)
    PERMISSION_DENIED = (grpc.StatusCode.PERMISSION_DENIED, 403)

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]


class AuthDenied(Exception):
    def __init__(self, denial: Denial, message: str) -> None:
        super().__init__(message)
        self.denial = denial


@dataclass(frozen=True)
class AuthTokens:
    api: str | None = None
    admin: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)

    @classmethod
    def from_files(cls, api_file: str | None, admin_file: str | None) -> AuthTokens:
        """Tokens are read from files (never flags: a command line is visible to every user)."""
        return cls(api=read_token(api_file) if api_file else None,
                   admin=read_token(admin_file) if admin_file else None)


def read_token(path: str) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def check_bearer(authorization: str | None, tokens: AuthTokens, admin: bool) -> None:
    """Raises AuthDenied unless `authorization` ("Bearer <token>") opens the call."""
    if admin and tokens.admin:
        accepted = [tokens.admin]
    elif tokens.api:
        accepted = [t for t in (tokens.api, tokens.admin) if t]
    else:
        return  # no token guards this call
    presented = _bearer_token(authorization)
    if presented is None:
        raise AuthDenied(Denial.UNAUTHENTICATED, "missing credentials: send the header 'authorization: Bearer <token>'")
    if any(_same(presented, token) for token in accepted):
        return
    if admin and tokens.api and _same(presented, tokens.api):
        raise AuthDenied(Denial.PERMISSION_DENIED, "this RPC needs the admin token")
    raise AuthDenied(Denial.UNAUTHENTICATED, "invalid bearer token")


def http_authorizer(tokens: AuthTokens) -> Callable[[str | None], str | None]:
    """The HTTP API's `authorize` hook: the API token guards every /v1 route (refusal message, or None)."""

    def authorize(authorization: str | None) -> str | None:
        try:
            check_bearer(authorization, tokens, admin=False)
        except AuthDenied as denied:
            return str(denied)
        return None

    return authorize


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization or not authorization[:len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
        return None
    return authorization[len(BEARER_PREFIX):].strip() or None


def _same(presented: str, token: str) -> bool:
    return hmac.compare_digest(presented.encode(), token.encode())  # constant time


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Applies `check_bearer` to every RPC but health; a refused call never reaches the servicer."""

    def __init__(self, tokens: AuthTokens) -> None:
        self._tokens = tokens

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIX):
            return handler
        metadata = {key: value for key, value in handler_call_details.invocation_metadata or ()}
        try:
            check_bearer(metadata.get("authorization"), self._tokens, admin=method in ADMIN_METHODS)
        except AuthDenied as denied:
            return _refusing(handler, denied)
        return handler


def _refusing(handler: grpc.RpcMethodHandler, denied: AuthDenied) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with the denial."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(denied.denial.grpc_status, str(denied))

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(handler.request_streaming,
                                                                  handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
