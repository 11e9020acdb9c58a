"""The frontend's errors as transport-neutral statuses, which every API (gRPC, HTTP) maps to its own.

An expected failure raises a `ServiceError` (or a subclass), which carries the status the
client gets and its message. Anything else is a bug: `as_service_error` reports it as
INTERNAL and logs it.
"""

from __future__ import annotations

import enum
import logging

log = logging.getLogger("loraserve.frontend")


class StatusCode(enum.Enum):
    """The canonical error codes (google.rpc.Code); gRPC's status codes carry the same names."""

    CANCELLED = enum.auto()
    UNKNOWN = enum.auto()
    INVALID_ARGUMENT = enum.auto()
    DEADLINE_EXCEEDED = enum.auto()
    NOT_FOUND = enum.auto()
    ALREADY_EXISTS = enum.auto()
    PERMISSION_DENIED = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    FAILED_PRECONDITION = enum.auto()
    ABORTED = enum.auto()
    OUT_OF_RANGE = enum.auto()
    UNIMPLEMENTED = enum.auto()
    INTERNAL = enum.auto()
    UNAVAILABLE = enum.auto()
    DATA_LOSS = enum.auto()
    UNAUTHENTICATED = enum.auto()

    @classmethod
    def named(cls, name: str) -> StatusCode:
        """The code of that name; INTERNAL for a name that is none."""
        return cls.__members__.get(name, cls.INTERNAL)


class ServiceError(Exception):
    """A failure the client is told about: `code` and `message` (also `str(error)`)."""

    code = StatusCode.INTERNAL

    def __init__(self, message: str, code: StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


def error_code(error: Exception) -> StatusCode:
    """The status an error maps to (INTERNAL for anything unexpected)."""
    return error.code if isinstance(error, ServiceError) else StatusCode.INTERNAL


def as_service_error(error: Exception) -> ServiceError:
    """The error a client gets for `error`; unexpected errors are logged."""
    if isinstance(error, ServiceError):
        return error
    log.exception("unexpected error in a request", exc_info=error)
    return ServiceError(f"internal error: {type(error).__name__}: {error}", StatusCode.INTERNAL)
