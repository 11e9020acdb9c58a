"""Transport-neutral statuses: what the scheduler's codes become, and how each API names them."""

from __future__ import annotations

import grpc
import pytest

from frontend.errors import ServiceError, StatusCode, as_service_error, error_code
from frontend.grpc_api import grpc_code
from frontend.scheduler_link import SchedulerFailure, status_code
from protos.loraserve.v1 import internal_pb2


@pytest.mark.parametrize("code", list(StatusCode))
def test_every_status_is_the_grpc_status_of_its_name(code: StatusCode):
    assert grpc_code(ServiceError("x", code)) is getattr(grpc.StatusCode, code.name)


def test_scheduler_error_codes_map_by_name_and_anything_else_is_internal():
    for name, value in internal_pb2.ErrorCode.items():
        expected = StatusCode.INTERNAL if name == "ERROR_CODE_UNSPECIFIED" else StatusCode[name]
        assert status_code(value) is expected
    assert status_code(999) is StatusCode.INTERNAL


def test_a_scheduler_failure_without_a_message_names_its_code():
    failure = SchedulerFailure(internal_pb2.Error(code=internal_pb2.RESOURCE_EXHAUSTED))
    assert (failure.code, failure.message) == (StatusCode.RESOURCE_EXHAUSTED,
                                               "the scheduler failed the request (RESOURCE_EXHAUSTED)")


def test_an_unexpected_error_is_internal_and_logged(caplog: pytest.LogCaptureFixture):
    error = RuntimeError("boom")
    failure = as_service_error(error)
    assert (failure.code, failure.message) == (StatusCode.INTERNAL, "internal error: RuntimeError: boom")
    assert error_code(error) is StatusCode.INTERNAL
    assert "unexpected error in a request" in caplog.text


def test_a_service_error_passes_through_unchanged():
    error = ServiceError("gone", StatusCode.NOT_FOUND)
    assert as_service_error(error) is error and error_code(error) is StatusCode.NOT_FOUND
