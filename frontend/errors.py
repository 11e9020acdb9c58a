"""How the frontend's errors map to status codes, for every API (gRPC, HTTP)."""

from __future__ import annotations

import logging

import grpc

from frontend.scheduler_link import RequestIdInUse, SchedulerFailure, SchedulerUnavailable
from frontend.validation import InvalidRequest

log = logging.getLogger("loraserve.frontend")
EXPECTED_ERRORS = (InvalidRequest, SchedulerUnavailable, SchedulerFailure, RequestIdInUse)


def error_code(error: Exception) -> grpc.StatusCode:
    """The status an error maps to (INTERNAL for anything unexpected)."""
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, SchedulerUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, SchedulerFailure):
        return error.status
    if isinstance(error, RequestIdInUse):
        return grpc.StatusCode.ALREADY_EXISTS
    return grpc.StatusCode.INTERNAL


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a client gets for an error; unexpected errors are logged."""
    if isinstance(error, EXPECTED_ERRORS):
        return error_code(error), str(error)
    log.exception("unexpected error in a request", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
