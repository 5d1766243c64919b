"""Domain errors, raised where a problem is found and mapped to gRPC status codes in one place.

Each carries a `reason` (the contract's ErrorReason, sent in google.rpc.ErrorInfo) and the
figures a program can act on; status.py turns them into a google.rpc.Status.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import ClassVar

# ErrorInfo.metadata values: the limit, the value and such (sent as strings)
Figures = Mapping[str, str | int | float]


class Reason(StrEnum):
    """genstruct.v1.ErrorReason without its ERROR_REASON_ prefix (the proto documents each)."""

    FIELD_INVALID = "FIELD_INVALID"
    MESSAGE_MALFORMED = "MESSAGE_MALFORMED"
    CONTEXT_OVERFLOW = "CONTEXT_OVERFLOW"
    TOO_MANY_CHUNKS = "TOO_MANY_CHUNKS"
    QUEUE_FULL = "QUEUE_FULL"
    LOADING = "LOADING"
    DRAINING = "DRAINING"
    ENGINE_FAILED = "ENGINE_FAILED"
    NOT_SERVING = "NOT_SERVING"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    DOCUMENT_TIMEOUT = "DOCUMENT_TIMEOUT"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class GenstructError(Exception):
    """Base of every error the service reports to a caller; the message is shown as is.

    `figures` go to the caller as ErrorInfo metadata; `retry_after` (seconds) as RetryInfo,
    where the code is one a caller retries.
    """

    reason: ClassVar[Reason] = Reason.INTERNAL_ERROR

    def __init__(
        self, message: str = "", *, figures: Figures | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.figures: dict[str, str | int | float] = dict(figures or {})
        self.retry_after = retry_after


class InvalidRequest(GenstructError):
    """The request itself is wrong (a field out of range, too long): INVALID_ARGUMENT.

    `field` is the request field's path (`document.content`, `sampling.stop[1]`), sent in a
    google.rpc.BadRequest field violation with `problem` as its description.
    """

    reason = Reason.FIELD_INVALID

    def __init__(self, field: str, problem: str, *, figures: Figures | None = None) -> None:
        super().__init__(f"{field}: {problem}", figures={"field": field, **(figures or {})})
        self.field = field
        self.problem = problem


class MalformedRequest(GenstructError):
    """The request's bytes are not a valid message: INVALID_ARGUMENT naming no field."""

    reason = Reason.MESSAGE_MALFORMED

    def __init__(self, why: str) -> None:
        super().__init__(f"request: is not a valid protobuf message: {why}")


class ContextOverflow(InvalidRequest):
    """The prompt plus the tokens asked for can never fit the context: INVALID_ARGUMENT."""

    reason = Reason.CONTEXT_OVERFLOW


class TooManyChunks(InvalidRequest):
    """Chunking would split the content into more parts than max_chunks: INVALID_ARGUMENT."""

    reason = Reason.TOO_MANY_CHUNKS


class QueueFull(GenstructError):
    """The engine's queue is full; retry later with backoff: RESOURCE_EXHAUSTED."""

    reason = Reason.QUEUE_FULL


class Unavailable(GenstructError):
    """The service takes no work now (the subclasses say why): UNAVAILABLE."""

    reason = Reason.NOT_SERVING


class Loading(Unavailable):
    """The model is still loading: UNAVAILABLE."""

    reason = Reason.LOADING


class Draining(Unavailable):
    """The server (or its engine) is shutting down: UNAVAILABLE."""

    reason = Reason.DRAINING


class ModelError(GenstructError):
    """The model cannot be had or loaded (missing, corrupt, not a GGUF file, offline).

    Raised while serving, it means the engine failed: UNAVAILABLE.
    """

    reason = Reason.ENGINE_FAILED


class Unauthenticated(GenstructError):
    """No bearer token, or the wrong one, on a server that requires one: UNAUTHENTICATED."""

    reason = Reason.UNAUTHENTICATED


class DocumentTimeout(GenstructError):
    """A GenerateBatch document's own timeout_ms ran out: DEADLINE_EXCEEDED for it alone."""

    reason = Reason.DOCUMENT_TIMEOUT
