"""The one interceptor of the service: request id, auth, logging, metrics and error mapping.

It wraps unary and streaming handlers alike (one `_serving` scope), so a domain error raised
anywhere in a handler (before or after the first streamed message) becomes the same status,
with the same details (status.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from .errors import GenstructError, MalformedRequest, Unauthenticated
from .metrics import Metrics
from .status import RetryDelay, code_of, error_status, internal_status, trailers

log = logging.getLogger("genstruct_service.rpc")

REQUEST_ID_KEY = "x-request-id"
SERVICE_PREFIX = "/genstruct.v1.GenstructService/"
# A caller's request id is echoed only when it is short and printable; otherwise a new one.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")

if TYPE_CHECKING:  # generic only in grpc-stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor


@dataclass
class CallRecord:
    """What one RPC did, filled in by the servicer and logged when the call ends."""

    request_id: str
    method: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    draft_tokens: int = 0  # speculation: drafted and verified, and of those accepted
    accepted_draft_tokens: int = 0
    documents: int = 0


_current: ContextVar[CallRecord | None] = ContextVar("genstruct_call", default=None)


def current_call() -> CallRecord | None:
    """The record of the RPC the running task serves (None outside an RPC)."""
    return _current.get()


def _own_delay(error: GenstructError) -> float | None:
    """The wait an error was raised with (a server without ServiceState's estimates)."""
    return error.retry_after


@dataclass(frozen=True)
class _Malformed:
    """A request message that did not parse; the handler reports it as INVALID_ARGUMENT."""

    reason: str

    def error(self) -> MalformedRequest:
        return MalformedRequest(self.reason)


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The handler's deserializer, returning _Malformed where it would raise.

    gRPC answers a deserializer's exception with UNKNOWN before any handler runs (and, on a
    request stream, with an exception in the middle of the handler), so bytes that are not a
    valid message (e.g. a string field that is not UTF-8) are turned into a value the
    handler can refuse with INVALID_ARGUMENT instead.
    """
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Malformed(str(exc))

    return parse


class _Checked:
    """A request stream that raises MalformedRequest at a malformed message.

    A plain iterator, not an async generator, so nothing is left suspended (and finalized
    later by the garbage collector) when the call ends mid-stream.
    """

    def __init__(self, requests: AsyncIterator[Any]) -> None:
        self._requests = requests
        self._iterator: AsyncIterator[Any] | None = None

    def __aiter__(self) -> _Checked:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = aiter(self._requests)
        request = await anext(self._iterator)
        if isinstance(request, _Malformed):
            raise request.error()
        return request


def _check_request(request: Any, streamed: bool) -> Any:
    """The request, refusing a malformed one (or, for a request stream, each malformed one)."""
    if streamed:
        return _Checked(request)
    if isinstance(request, _Malformed):
        raise request.error()
    return request


def _code_name(code: Any) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


class ServiceInterceptor(_Interceptor):
    """Wraps every GenstructService handler; health and reflection pass through untouched."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        auth_token: str | None = None,
        retry_delay: RetryDelay = _own_delay,
    ) -> None:
        self._metrics = metrics
        self._token = auth_token.encode() if auth_token else None
        self._retry_delay = retry_delay

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        metadata = {k: v for k, v in handler_call_details.invocation_metadata or ()}
        given_id = metadata.get(REQUEST_ID_KEY)
        request_id = (
            given_id
            if isinstance(given_id, str) and _REQUEST_ID.fullmatch(given_id)
            else uuid.uuid4().hex
        )
        authorized = self._authorized(metadata.get("authorization"))
        name = method.removeprefix(SERVICE_PREFIX)
        call = _Call(self._metrics, CallRecord(request_id, name), authorized, self._retry_delay)
        return call.wrap(handler)

    def _authorized(self, header: Any) -> bool:
        if self._token is None:
            return True
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header.removeprefix("Bearer ").strip().encode(), self._token)


class _Call:
    """One RPC: runs its handler, maps what it raises, then logs and counts it."""

    def __init__(
        self, metrics: Metrics | None, record: CallRecord, authorized: bool,
        retry_delay: RetryDelay,
    ) -> None:
        self.metrics = metrics
        self.record = record
        self.authorized = authorized
        self.retry_delay = retry_delay
        self.code: grpc.StatusCode = grpc.StatusCode.OK
        self.started = 0.0
        self.peer = ""

    def wrap(self, handler: Handler) -> Handler:
        kwargs = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary), **kwargs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, streamed=True), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream), **kwargs
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, streamed=True), **kwargs
        )

    async def _begin(
        self, context: grpc.aio.ServicerContext[Any, Any], *, stream_out: bool
    ) -> None:
        self.started = time.perf_counter()
        # Read while the call is surely alive: context.peer() once the call has ended
        # (a deadline, a cancellation) can read freed memory in grpc core and crash.
        self.peer = context.peer()
        _current.set(self.record)
        pair = ((REQUEST_ID_KEY, self.record.request_id),)
        context.set_trailing_metadata(pair)
        if stream_out:
            # A streaming caller learns the id at once. A unary response carries it only in
            # its trailers: headers sent early would stop gRPC's own retry of UNAVAILABLE and
            # RESOURCE_EXHAUSTED, which only retries calls that received no headers.
            await context.send_initial_metadata(pair)
        if not self.authorized:
            raise Unauthenticated(
                "this server requires a bearer token: send metadata "
                "`authorization: Bearer <token>`"
            )

    @asynccontextmanager
    async def _serving(
        self, context: grpc.aio.ServicerContext[Any, Any], *, stream_out: bool
    ) -> AsyncIterator[None]:
        """The scope of one handler, unary or streaming: what it raises becomes the call's
        status (with its details), and the call is logged and counted when it ends."""
        try:
            await self._begin(context, stream_out=stream_out)
            yield
            self.code = context.code() or grpc.StatusCode.OK
        except BaseException as exc:
            await self._fail(exc, context)
            raise
        finally:
            self._finish(context)

    def _unary(self, behavior: Callable[..., Any], *, streamed: bool = False) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with self._serving(context, stream_out=False):
                response = await behavior(_check_request(request, streamed), context)
            return response

        return run

    def _streaming(
        self, behavior: Callable[..., Any], *, streamed: bool = False
    ) -> Callable[..., Any]:
        async def run(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async with self._serving(context, stream_out=True):
                responses = behavior(_check_request(request, streamed), context)
                async with aclosing(responses):
                    async for response in responses:
                        yield response

        return run

    async def _fail(self, exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Abort with the status `exc` stands for; returns only when `exc` should propagate."""
        if isinstance(exc, grpc.aio.AbortError):  # the handler already chose the status
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            return
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            remaining = context.time_remaining()
            self.code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if remaining is not None and remaining <= 0
                else grpc.StatusCode.CANCELLED
            )
            return
        remaining = context.time_remaining()
        ended = context.cancelled() or (remaining is not None and remaining <= 0)
        if not isinstance(exc, GenstructError) and ended:
            # The call ended under the handler (its deadline passed, or the caller cancelled
            # it), so gRPC refuses what the handler does next: not a bug of ours.
            self.code = (
                grpc.StatusCode.CANCELLED
                if remaining is None or remaining > 0
                else grpc.StatusCode.DEADLINE_EXCEEDED
            )
            return
        if isinstance(exc, GenstructError):
            status = error_status(exc, self.retry_delay(exc))
        else:
            log.error(
                "bug while serving %s",
                self.record.method,
                exc_info=exc,
                extra={"request_id": self.record.request_id},
            )
            status = internal_status(self.record.request_id)
        self.code = code_of(status)
        await context.abort(
            self.code,
            status.message,
            trailing_metadata=((REQUEST_ID_KEY, self.record.request_id), *trailers(status)),
        )

    def _finish(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        duration = time.perf_counter() - self.started
        record = self.record
        code = _code_name(self.code)
        if self.metrics is not None:
            self.metrics.requests.labels(record.method, code).inc()
            self.metrics.latency.labels(record.method).observe(duration)
        log.info(
            "%s %s in %.1f ms",
            record.method,
            code,
            duration * 1000.0,
            extra={
                "request_id": record.request_id,
                "method": record.method,
                "code": code,
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "draft_tokens": record.draft_tokens,
                "accepted_draft_tokens": record.accepted_draft_tokens,
                "documents": record.documents,
                "duration_ms": round(duration * 1000.0, 2),
                "peer": self.peer,
            },
        )
