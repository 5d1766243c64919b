"""What a refusal says beyond its code: the google.rpc.Status details the server sends.

The server puts them in a call's `grpc-status-details-bin` trailer and in a GenerateBatch
document's `error`; `ErrorDetails` reads either, and the clients raise `GenstructRpcError`,
a grpc.aio.AioRpcError (so a grpc.RpcError) that exposes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "genstruct.v1"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One wrong request field: its path (`document.content`, `sampling.stop[1]`) and why."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """The details of one refusal; every field is empty when the server sent none."""

    reason: str | None = None  # genstruct.v1.ErrorReason without its prefix: "QUEUE_FULL"
    metadata: Mapping[str, str] = field(default_factory=dict)  # ErrorInfo's figures
    field_violations: tuple[FieldViolation, ...] = ()
    retry_delay: float | None = None  # seconds the server asks a caller to wait (RetryInfo)
    packed: tuple[any_pb2.Any, ...] = field(default=(), repr=False)  # the details as sent

    @property
    def field(self) -> str | None:
        """The path of the (first) wrong field, if one was named."""
        return self.field_violations[0].field if self.field_violations else None

    @classmethod
    def from_status(cls, status: status_pb2.Status | None) -> ErrorDetails:
        """The details packed in a google.rpc.Status (a GenerateBatch `error`, a trailer's)."""
        if status is None:
            return cls()
        reason: str | None = None
        metadata: dict[str, str] = {}
        violations: list[FieldViolation] = []
        delay: float | None = None
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.domain == DOMAIN:
                    reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                delay = retry.retry_delay.ToNanoseconds() / 1e9
        return cls(reason, metadata, tuple(violations), delay, tuple(status.details))

    @classmethod
    def from_error(cls, error: grpc.RpcError) -> ErrorDetails:
        """The details in a failed call's trailer (none for a status gRPC made up itself)."""
        if isinstance(error, GenstructRpcError):
            return error.error_details
        try:
            status = rpc_status.from_call(cast(grpc.Call, error))
        except (ValueError, AttributeError):  # details that contradict the status: not ours
            return cls()
        return cls.from_status(status)


def _metadata(values: Any) -> grpc.aio.Metadata:
    if isinstance(values, grpc.aio.Metadata):
        return values
    return grpc.aio.Metadata(*(tuple(pair) for pair in values or ()))


class GenstructRpcError(grpc.aio.AioRpcError):
    """A failed call, as gRPC reported it (code(), details(), trailing_metadata()), with the
    server's details read: `reason`, `field_violations`, `retry_delay`, `error_details`."""

    def __init__(self, error: grpc.RpcError) -> None:
        call = cast(grpc.Call, error)
        debug = getattr(error, "debug_error_string", None)
        super().__init__(
            code=call.code(),
            initial_metadata=_metadata(call.initial_metadata()),
            trailing_metadata=_metadata(call.trailing_metadata()),
            details=call.details(),
            debug_error_string=debug() if callable(debug) else None,
        )
        self.error_details = ErrorDetails.from_error(error)

    @property
    def reason(self) -> str | None:
        return self.error_details.reason

    @property
    def field_violations(self) -> tuple[FieldViolation, ...]:
        return self.error_details.field_violations

    @property
    def retry_delay(self) -> float | None:
        return self.error_details.retry_delay


def rich_error(error: grpc.RpcError) -> GenstructRpcError:
    """`error` as a GenstructRpcError (itself when it is one)."""
    return error if isinstance(error, GenstructRpcError) else GenstructRpcError(error)
