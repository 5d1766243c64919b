"""The reasons the server sends are the contract's: genstruct.v1.ErrorReason lists each one."""

from __future__ import annotations

import grpc
from genstruct.v1 import genstruct_pb2
from genstruct_service.errors import ContextOverflow, InvalidRequest, QueueFull, Reason
from genstruct_service.status import error_status, retry_delay_of, trailers
from google.rpc import error_details_pb2

PREFIX = "ERROR_REASON_"


def test_every_reason_is_in_the_proto_and_every_proto_reason_is_sent() -> None:
    names = genstruct_pb2.ErrorReason.keys()
    listed = {name.removeprefix(PREFIX) for name in names if name != "ERROR_REASON_UNSPECIFIED"}
    assert {reason.value for reason in Reason} == listed
    assert all(name.startswith(PREFIX) for name in names)


def test_every_reason_has_a_status_code() -> None:
    for reason in Reason:
        error = type("Some", (InvalidRequest,), {"reason": reason})("id", "is wrong")
        assert error_status(error).code != grpc.StatusCode.OK.value[0]


def test_retry_info_goes_only_with_codes_callers_retry() -> None:
    full = error_status(QueueFull("the queue is full"), retry_delay=1.5)
    assert retry_delay_of(full) == 1.5
    assert dict(trailers(full))["grpc-retry-pushback-ms"] == "1500"
    bad = error_status(ContextOverflow("document.content", "too long"), retry_delay=1.5)
    assert retry_delay_of(bad) is None
    assert "grpc-retry-pushback-ms" not in dict(trailers(bad))
    info = error_details_pb2.ErrorInfo()
    bad.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("CONTEXT_OVERFLOW", "genstruct.v1")
