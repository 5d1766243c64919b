"""The asyncio client of the Genstruct service."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from genstruct.v1 import genstruct_pb2 as pb
from genstruct.v1 import genstruct_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2_grpc

from genstruct_client._batching import (
    ITEM_RETRY_CODES,
    BatchAborted,
    Item,
    ResubmitPolicy,
    Scheduler,
    error_response,
    stream_failure_is_transient,
)
from genstruct_client._calls import (
    StreamAttempts,
    Target,
    client_config,
    health_request,
    status_name,
)
from genstruct_client.channel import ChannelConfig, create_aio_channel, honour
from genstruct_client.errors import ErrorDetails, rich_error
from genstruct_client.types import GenerationOptions, RequestLike, to_request

log = logging.getLogger("genstruct_client")

_Outcome = pb.GenerateResponse | BaseException | None
# why a stream failed: its code, its message, and the server's details (RetryInfo included)
_Failure = tuple[grpc.StatusCode, str, ErrorDetails]
_DEADLINE_EXCEEDED: int = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
_MAX_TIMEOUT_MS = 2**32 - 1  # uint32


class AsyncGenstructClient:
    """Calls a Genstruct service (or several, round_robin) from asyncio code.

    Use it as `async with AsyncGenstructClient("127.0.0.1:50051") as client:`; create it
    inside the event loop that uses it. `timeout` arguments are deadlines in seconds. Calls
    refused with UNAVAILABLE or RESOURCE_EXHAUSTED are retried, each in one layer (see
    RetryPolicy). A failed call raises GenstructRpcError (a grpc.aio.AioRpcError) with the
    server's `reason`, `field_violations` and `retry_delay`.
    """

    def __init__(self, target: Target = None, *, config: ChannelConfig | None = None) -> None:
        self.config = config = client_config(target, config)
        self._channel = create_aio_channel(config)
        self._stub = pb_grpc.GenstructServiceStub(self._channel)  # typed as the async stub
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = config.metadata()

    async def __aenter__(self) -> AsyncGenstructClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def wait_ready(self, timeout: float) -> None:
        """Waits until the channel has connected (raises TimeoutError otherwise)."""
        await asyncio.wait_for(self._channel.channel_ready(), timeout)

    async def generate(
        self,
        document: RequestLike,
        options: GenerationOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.GenerateResponse:
        """Pairs for one document (a Document with `options`, or a ready GenerateRequest)."""
        request = to_request(document, options)
        try:
            return await self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise rich_error(exc) from None

    async def generate_stream(
        self,
        document: RequestLike,
        options: GenerationOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        """Text deltas as they are generated, then one message with the result.

        Leaving the loop early cancels the call and frees the server's slot. Refusals are
        retried here until the first message: gRPC's retry ends at the stream's headers.
        """
        request = to_request(document, options)
        attempts = StreamAttempts(self.config, timeout)
        async for left in attempts:
            call = self._stub.GenerateStream(request, timeout=left, metadata=self._metadata)
            try:
                async for message in call:
                    attempts.received = True
                    yield message
                return
            except grpc.aio.AioRpcError as exc:
                attempts.failed(exc)
            finally:
                call.cancel()

    async def generate_batch(
        self,
        requests: AsyncIterator[pb.GenerateRequest] | Iterable[pb.GenerateRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The raw GenerateBatch stream: results in the order they finish, matched by id.

        No resubmission on failure; `generate_many` does that.
        """
        source = requests if isinstance(requests, AsyncIterator) else iter(requests)
        call = self._stub.GenerateBatch(source, timeout=timeout, metadata=self._metadata)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise rich_error(exc) from None
        finally:
            call.cancel()

    async def model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        """The loaded model and the server's limits and defaults."""
        try:
            return await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise rich_error(exc) from None

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The health status name ("SERVING", "NOT_SERVING", ...) of `service` ("" = server)."""
        request = health_request(service)
        response = await self._health.Check(request, timeout=timeout, metadata=self._metadata)
        return status_name(response)

    async def generate_many(
        self,
        documents: Iterable[RequestLike],
        options: GenerationOptions | None = None,
        *,
        window: int = 32,
        streams: int = 1,
        deadline: float | None = None,
        policy: ResubmitPolicy | None = None,
        documents_per_stream: int | None = None,
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Results for many documents, as they finish, each document's exactly once.

        Drives GenerateBatch with at most `window` documents in flight per lane, over `streams`
        lanes (use one per server behind round_robin, which balances calls, not messages). A lane
        sends at most `documents_per_stream` documents (default 8 * window; `window` on its first
        stream) on one stream; when the window has room again it opens the next stream while the old
        one finishes, so round_robin keeps spreading the work, also onto servers that come back.
        Documents need unique ids; `documents` is read lazily. A stream that breaks is reopened
        (backoff with jitter) and the documents that had no result yet are sent again; a document
        refused for good, or out of tries, comes back with `error` set. `deadline` bounds each
        document's time at the server, from when the server reads it off the stream (its wait for a
        slot included) to its result; it is sent as the request's `timeout_ms`, so the server stops
        that document alone and answers it DEADLINE_EXCEEDED, which uses up one of its tries. Other
        documents are not disturbed.
        Raises BatchAborted when no result has come back for `policy.budget_seconds`.
        """
        if window < 1 or streams < 1:
            raise ValueError("window and streams must be at least 1")
        policy = policy or ResubmitPolicy()
        quota = documents_per_stream or 8 * window
        timeout_ms = _timeout_ms(deadline)
        requests = (
            _with_timeout(to_request(document, options), timeout_ms) for document in documents
        )
        scheduler = Scheduler(requests)
        out: asyncio.Queue[_Outcome] = asyncio.Queue(maxsize=window * streams)
        lanes = [
            asyncio.create_task(self._lane(scheduler, out, window, quota, policy))
            for _ in range(streams)
        ]
        running = len(lanes)
        try:
            while running:
                outcome = await out.get()
                if outcome is None:
                    running -= 1
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    yield outcome
        finally:
            for lane in lanes:
                lane.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)

    async def _lane(
        self,
        scheduler: Scheduler,
        out: asyncio.Queue[_Outcome],
        window: int,
        quota: int,
        policy: ResubmitPolicy,
    ) -> None:
        """One lane: successive streams sharing a window of `window` documents in flight."""
        room = asyncio.Semaphore(window)
        draining: set[asyncio.Task[_Failure | None]] = set()
        live: set[asyncio.Task[Any]] = set()  # every task this lane started and not reaped
        failures = 0  # failed streams in a row
        # The first stream is short: it opens while the channel's connections are still
        # coming up, so round_robin puts it (and every other lane's) on the first server to
        # answer; the streams after it spread over every server that is ready by then.
        stream_quota = min(window, quota)

        def reap() -> None:
            for task in [t for t in draining if t.done()]:
                draining.discard(task)
                live.discard(task)
                task.result()  # a stream-wide error that is not transient is raised here

        try:
            while True:
                full = asyncio.Event()
                stream = asyncio.create_task(
                    self._stream(scheduler, out, room, stream_quota, full, policy)
                )
                stream_quota = quota
                full_wait = asyncio.create_task(full.wait())
                live |= {stream, full_wait}
                await asyncio.wait({stream, full_wait}, return_when=asyncio.FIRST_COMPLETED)
                full_wait.cancel()
                live.discard(full_wait)
                reap()
                if not stream.done():  # sent its quota
                    draining.add(stream)
                    failures = 0
                    # A call is bound to a server when it opens (round_robin picks among the
                    # connections ready then), so the next stream opens once it can send:
                    # after a result, by when every server that is up has been connected.
                    await _until_room(room, draining)
                    reap()
                    continue
                live.discard(stream)
                failure = stream.result()
                if failure is None:
                    if scheduler.finished:
                        break
                    failures = 0
                    continue
                code, details, error_details = failure
                failures += 1
                await asyncio.sleep(
                    honour(policy.backoff(failures), error_details.retry_delay, policy.max_backoff)
                )
                remaining = policy.budget_seconds - scheduler.stalled_for()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    # The next stream goes to a live connection (round_robin: a ready server).
                    await asyncio.wait_for(self._channel.channel_ready(), remaining)
                except TimeoutError:
                    raise BatchAborted(
                        code,
                        f"no result for {policy.budget_seconds:g}s; last error: {details}",
                        error_details,
                    ) from None
            for result in await asyncio.gather(*draining):
                del result  # failures of draining streams were handled by the streams
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await out.put(exc)
        else:
            await out.put(None)
        finally:
            for task in live:
                task.cancel()
            await asyncio.gather(*live, return_exceptions=True)

    async def _stream(
        self,
        scheduler: Scheduler,
        out: asyncio.Queue[_Outcome],
        room: asyncio.Semaphore,
        quota: int,
        full: asyncio.Event,
        policy: ResubmitPolicy,
    ) -> _Failure | None:
        """One GenerateBatch stream, until it ends; returns why it failed, None if it did not.

        On a transient failure the documents that had no result are handed back to the
        scheduler (or reported, when out of tries); other failures raise BatchAborted.
        """
        call = self._stub.GenerateBatch(None, metadata=self._metadata)
        in_flight: dict[str, Item] = {}
        inbox: asyncio.Queue[_Inbox] = asyncio.Queue()
        pump = asyncio.create_task(_pump(call, inbox))
        writer = asyncio.create_task(_feed(call, scheduler, in_flight, room, quota, full, inbox))
        failure: _Failure | None = None
        transient = True  # whether the failure is worth reopening the stream for
        answered = False  # the server answered on this stream: it was working on it
        try:
            while True:
                message = await inbox.get()
                if isinstance(message, _SourceFailed):
                    raise message.error
                if isinstance(message, grpc.aio.AioRpcError):
                    failure = (
                        message.code(), message.details() or "", ErrorDetails.from_error(message)
                    )
                    transient = stream_failure_is_transient(message)
                    break
                if message is None:  # the server closed the stream
                    if in_flight:
                        ended = "stream ended early"
                        failure = (grpc.StatusCode.UNAVAILABLE, ended, ErrorDetails())
                    break
                item = in_flight.pop(message.id, None)
                if item is None:
                    log.warning("result for an id not in flight: %r", message.id)
                    continue
                room.release()
                answered = True
                await self._settle(scheduler, out, item, message, policy)
        finally:
            call.cancel()
            for task in (pump, writer):
                task.cancel()
            await asyncio.gather(pump, writer, return_exceptions=True)
        if failure is None:
            return None
        code, details, error_details = failure
        if not transient:
            raise BatchAborted(code, details, error_details)
        log.warning(
            "GenerateBatch stream failed (%s: %s); resubmitting %d documents",
            code.name,
            details,
            len(in_flight),
        )
        # A try is used up by every document in flight on a stream the server was answering
        # when it broke. A stream that never got an answer (server down, loading, refusing)
        # costs no tries: the time budget bounds it.
        for item in in_flight.values():
            room.release()
            if answered:
                item.attempts += 1
            if item.attempts >= policy.max_attempts:
                scheduler.done(item)
                await out.put(error_response(
                    item, code.value[0], f"{details} ({item.attempts} tries)", error_details
                ))
            else:
                scheduler.retry(item, 0.0)
        return failure

    async def _settle(
        self,
        scheduler: Scheduler,
        out: asyncio.Queue[_Outcome],
        item: Item,
        response: pb.GenerateResponse,
        policy: ResubmitPolicy,
    ) -> None:
        scheduler.progress()
        code = response.error.code if response.HasField("error") else 0
        cancelled = code == 0 and any(
            pair.finish_reason == pb.FINISH_REASON_CANCELLED for pair in response.pairs
        )
        # DEADLINE_EXCEEDED on one document is its timeout_ms: the stream itself is fine
        if code in ITEM_RETRY_CODES or code == _DEADLINE_EXCEEDED or cancelled:
            item.attempts += 1
            if item.attempts < policy.max_attempts:
                hint = ErrorDetails.from_status(response.error).retry_delay
                backoff = policy.backoff(item.attempts)
                scheduler.retry(item, honour(backoff, hint, policy.max_backoff))
                return
            if cancelled:
                response = error_response(
                    item,
                    grpc.StatusCode.UNAVAILABLE.value[0],
                    f"generation cancelled by the server ({item.attempts} tries)",
                )
        scheduler.done(item)
        await out.put(response)


async def _until_room(room: asyncio.Semaphore, draining: set[asyncio.Task[Any]]) -> None:
    """Returns once the lane's window has room for a document (the room stays free for the
    next stream to take) or a draining stream has ended."""
    waiter = asyncio.create_task(room.acquire())
    try:
        await asyncio.wait({waiter, *draining}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if waiter.done() and not waiter.cancelled():
            room.release()
        else:
            waiter.cancel()


def _timeout_ms(deadline: float | None) -> int:
    """`deadline` seconds as GenerateRequest.timeout_ms (0: none), at least 1 ms."""
    if deadline is None:
        return 0
    if deadline <= 0:
        raise ValueError("deadline must be positive")
    return min(_MAX_TIMEOUT_MS, max(1, math.ceil(deadline * 1000)))


def _with_timeout(request: pb.GenerateRequest, timeout_ms: int) -> pb.GenerateRequest:
    """`request` with `timeout_ms` set; a copy, so the caller's request is left as it was."""
    if not timeout_ms:
        return request
    timed = pb.GenerateRequest()
    timed.CopyFrom(request)
    timed.timeout_ms = timeout_ms
    return timed


class _SourceFailed:
    """The documents' iterator raised: the error goes to the caller, not to a retry."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


# What the reading side of a stream gets: a result, the stream's error, None at its end, or
# word that the documents' iterator failed.
_Inbox = pb.GenerateResponse | grpc.aio.AioRpcError | _SourceFailed | None


async def _pump(
    call: grpc.aio.StreamStreamCall[pb.GenerateRequest, pb.GenerateResponse],
    inbox: asyncio.Queue[_Inbox],
) -> None:
    try:
        async for message in call:
            inbox.put_nowait(message)
    except grpc.aio.AioRpcError as exc:
        inbox.put_nowait(exc)
        return
    inbox.put_nowait(None)


async def _feed(
    call: grpc.aio.StreamStreamCall[pb.GenerateRequest, pb.GenerateResponse],
    scheduler: Scheduler,
    in_flight: dict[str, Item],
    room: asyncio.Semaphore,
    quota: int,
    full: asyncio.Event,
    inbox: asyncio.Queue[_Inbox],
) -> None:
    """Sends documents while the lane's window has room, up to the stream's quota."""
    sent = 0
    try:
        while sent < quota:
            await room.acquire()
            try:
                item = await scheduler.take()
            except BaseException:
                room.release()  # cancelled while waiting: the permit goes back
                raise
            if item is None:
                room.release()
                break
            if not item.request.id or item.request.id in in_flight:
                scheduler.done(item)
                raise ValueError(
                    f"generate_many needs a unique id per document, got {item.request.id!r}"
                )
            in_flight[item.request.id] = item
            sent += 1
            await call.write(item.request)
        else:
            full.set()
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
        return  # the stream broke; the reading side reports why
    except Exception as exc:
        inbox.put_nowait(_SourceFailed(exc))
