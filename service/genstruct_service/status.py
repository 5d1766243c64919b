"""Domain errors as google.rpc.Status: the code, the message, and the details a program acts on.

The one place that builds a refusal, for a call's trailer (unary and streaming alike) and for
a GenerateBatch document's `error`: ErrorInfo (reason, domain, figures) always, BadRequest for
a field, RetryInfo where the caller retries and the server knows a useful wait.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from .errors import GenstructError, InvalidRequest, Reason

DOMAIN = "genstruct.v1"
# gRPC's own retry (the clients' unary calls) waits this long instead of its backoff
PUSHBACK_KEY = "grpc-retry-pushback-ms"

_CODES: dict[Reason, grpc.StatusCode] = {
    Reason.FIELD_INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.MESSAGE_MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.CONTEXT_OVERFLOW: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.TOO_MANY_CHUNKS: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.LOADING: grpc.StatusCode.UNAVAILABLE,
    Reason.DRAINING: grpc.StatusCode.UNAVAILABLE,
    Reason.ENGINE_FAILED: grpc.StatusCode.UNAVAILABLE,
    Reason.NOT_SERVING: grpc.StatusCode.UNAVAILABLE,
    Reason.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.DOCUMENT_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reason.INTERNAL_ERROR: grpc.StatusCode.INTERNAL,
}
_RETRIED = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
_DEFAULT_MESSAGES = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the queue is full; retry later",
    grpc.StatusCode.UNAVAILABLE: "the service is not available",
}
_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}

# The wait (seconds) the server would have a refused caller keep, or None: no useful one.
RetryDelay = Callable[[GenstructError], float | None]


def code_of(status: status_pb2.Status) -> grpc.StatusCode:
    return _BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)


def error_status(error: GenstructError, retry_delay: float | None = None) -> status_pb2.Status:
    """The Status that reports `error`, with its details; `retry_delay` (seconds) becomes
    RetryInfo when the code is one callers retry."""
    code = _CODES[error.reason]
    info = error_details_pb2.ErrorInfo(
        reason=error.reason.value,
        domain=DOMAIN,
        metadata={key: str(value) for key, value in error.figures.items()},
    )
    status = status_pb2.Status(
        code=code.value[0], message=str(error) or _DEFAULT_MESSAGES.get(code, code.name)
    )
    status.details.add().Pack(info)
    if isinstance(error, InvalidRequest):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.problem
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    if retry_delay is not None and code in _RETRIED:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, round(retry_delay * 1e9)))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def internal_status(request_id: str) -> status_pb2.Status:
    """The Status of a bug: no detail of it leaks, only the id to report it with."""
    error = GenstructError(
        f"internal error; please report it with x-request-id {request_id}",
        figures={"requestId": request_id},
    )
    return error_status(error)


def retry_delay_of(status: status_pb2.Status) -> float | None:
    """The RetryInfo delay in `status`, in seconds; None when it has none."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def trailers(status: status_pb2.Status) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata that carries `status`: grpc-status-details-bin, and the retry
    pushback that gRPC's retry of unary calls honours where there is RetryInfo."""
    pairs: list[tuple[str, str | bytes]] = list(rpc_status.to_status(status).trailing_metadata)
    delay = retry_delay_of(status)
    if delay is not None:
        pairs.append((PUSHBACK_KEY, str(max(1, math.ceil(delay * 1000)))))
    return tuple(pairs)
