"""The asyncio client of the Genstruct service."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genstruct.v1 import genstruct_pb2 as pb
from genstruct.v1 import genstruct_pb2_grpc as pb_grpc
from genstruct_client._batching import (
    ITEM_RETRY_CODES,
    STREAM_RETRY_CODES,
    BatchAborted,
    Item,
    ResubmitPolicy,
    Scheduler,
    error_response,
)
from genstruct_client.channel import ChannelConfig, create_aio_channel, resolve_target
from genstruct_client.types import GenerationOptions, RequestLike, to_request

log = logging.getLogger("genstruct_client")

_Outcome = pb.GenerateResponse | BaseException | None


class AsyncGenstructClient:
    """Calls a Genstruct service (or several, round_robin) from asyncio code.

    Use it as `async with AsyncGenstructClient("127.0.0.1:50051") as client:`; create it
    inside the event loop that uses it. `timeout` arguments are deadlines in seconds.
    """

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        config: ChannelConfig | None = None,
    ) -> None:
        if config is None:
            config = ChannelConfig() if target is None else ChannelConfig(resolve_target(target))
        elif target is not None:
            raise TypeError("give either a target or a config, not both")
        self.config = config
        self._channel = create_aio_channel(config)
        self._stub = pb_grpc.GenstructServiceAsyncStub(self._channel)
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
        await self._channel.close()

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
        return await self._stub.Generate(request, timeout=timeout, metadata=self._metadata)

    async def generate_stream(
        self,
        document: RequestLike,
        options: GenerationOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Text deltas as they are generated, then one message with the result.

        Leaving the loop early cancels the call and frees the server's slot.
        """
        request = to_request(document, options)
        call = self._stub.GenerateStream(request, timeout=timeout, metadata=self._metadata)
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()

    async def generate_batch(
        self,
        requests: AsyncIterator[pb.GenerateRequest] | Iterable[pb.GenerateRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The raw GenerateBatch stream: results in the order they finish, matched by id.

        No resubmission on failure; `generate_many` does that.
        """
        call = self._stub.GenerateBatch(requests, timeout=timeout, metadata=self._metadata)
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()

    async def model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        """The loaded model and the server's limits and defaults."""
        return await self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata
        )

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The health status name ("SERVING", "NOT_SERVING", ...) of `service` ("" = server)."""
        response = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=timeout,
            metadata=self._metadata,
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def generate_many(
        self,
        documents: Iterable[RequestLike],
        options: GenerationOptions | None = None,
        *,
        window: int = 32,
        streams: int = 1,
        deadline: float | None = None,
        policy: ResubmitPolicy | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Results for many documents, as they finish, each document's exactly once.

        Drives GenerateBatch with at most `window` documents in flight per stream, over
        `streams` streams (open one per server to use several behind round_robin, which
        balances calls, not messages). Documents need unique ids. `documents` is read lazily.
        A stream that breaks is reopened (backoff with jitter) and the documents that had no
        result yet are sent again; a document refused for good, or out of tries, comes back
        with `error` set. `deadline` bounds each document's time from when it is sent: past
        it, its stream is cancelled and reopened and the document uses up one try.
        Raises BatchAborted when no result has come back for `policy.budget_seconds`.
        """
        if window < 1 or streams < 1:
            raise ValueError("window and streams must be at least 1")
        policy = policy or ResubmitPolicy()
        requests = (to_request(document, options) for document in documents)
        scheduler = Scheduler(requests)
        out: asyncio.Queue[_Outcome] = asyncio.Queue(maxsize=window * streams)
        workers = [
            asyncio.create_task(self._batch_worker(scheduler, out, window, deadline, policy))
            for _ in range(streams)
        ]
        running = len(workers)
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
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _batch_worker(
        self,
        scheduler: Scheduler,
        out: asyncio.Queue[_Outcome],
        window: int,
        deadline: float | None,
        policy: ResubmitPolicy,
    ) -> None:
        try:
            await self._run_streams(scheduler, out, window, deadline, policy)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await out.put(exc)
        else:
            await out.put(None)

    async def _run_streams(
        self,
        scheduler: Scheduler,
        out: asyncio.Queue[_Outcome],
        window: int,
        deadline: float | None,
        policy: ResubmitPolicy,
    ) -> None:
        failures = 0  # stream failures in a row without a result in between
        while not scheduler.finished:
            call = self._stub.GenerateBatch(metadata=self._metadata)
            in_flight: dict[str, Item] = {}
            room = asyncio.Semaphore(window)
            writer = asyncio.create_task(self._feed(call, scheduler, in_flight, room))
            failure: tuple[grpc.StatusCode, str] | None = None
            expired: Item | None = None
            try:
                while True:
                    timeout = None
                    oldest: Item | None = None
                    if deadline is not None and in_flight:
                        oldest = min(in_flight.values(), key=lambda item: item.sent_at)
                        timeout = max(0.0, oldest.sent_at + deadline - time.monotonic())
                    try:
                        response = await asyncio.wait_for(call.read(), timeout)
                    except TimeoutError:
                        expired = oldest
                        failure = (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                        break
                    if response is grpc.aio.EOF:
                        break
                    assert isinstance(response, pb.GenerateResponse)
                    item = in_flight.pop(response.id, None)
                    if item is None:
                        log.warning("result for an id not in flight: %r", response.id)
                        continue
                    room.release()
                    failures = 0
                    await self._settle(scheduler, out, item, response, policy)
            except grpc.aio.AioRpcError as exc:
                failure = (exc.code(), exc.details() or "")
            finally:
                call.cancel()
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if writer.done() and not writer.cancelled() and writer.exception() is not None:
                raise writer.exception()  # type: ignore[misc]  # the source failed, not gRPC
            if failure is None:
                if not in_flight:
                    continue  # the stream ended cleanly; loop ends when the scheduler is done
                failure = (grpc.StatusCode.UNAVAILABLE, "stream ended before every result")
            code, message = failure
            if code not in STREAM_RETRY_CODES and code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise BatchAborted(code, message)
            failures += 1
            log.warning(
                "GenerateBatch stream failed (%s: %s); resubmitting %d documents",
                code.name,
                message,
                len(in_flight),
            )
            for item in in_flight.values():
                if expired is None or item is expired:
                    item.attempts += 1
                item.last_code, item.last_message = code.value[0], message
                if item.attempts >= policy.max_attempts:
                    scheduler.done(item)
                    await out.put(
                        error_response(item, code.value[0], f"{message} ({item.attempts} tries)")
                    )
                else:
                    scheduler.retry(item, 0.0)
            if scheduler.stalled_for() > policy.budget_seconds:
                raise BatchAborted(
                    code, f"no result for {policy.budget_seconds:g}s; last error: {message}"
                )
            await asyncio.sleep(policy.backoff(failures))

    async def _feed(
        self,
        call: grpc.aio.StreamStreamCall[pb.GenerateRequest, pb.GenerateResponse],
        scheduler: Scheduler,
        in_flight: dict[str, Item],
        room: asyncio.Semaphore,
    ) -> None:
        try:
            while True:
                await room.acquire()
                item = await scheduler.take()
                if item is None:
                    break
                if not item.request.id or item.request.id in in_flight:
                    raise ValueError(
                        f"generate_many needs a unique id per document, got {item.request.id!r}"
                    )
                item.sent_at = time.monotonic()
                in_flight[item.request.id] = item
                await call.write(item.request)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            return  # the stream broke; the reading side reports why
        except Exception:
            call.cancel()  # wakes the reading side
            raise

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
        if code in ITEM_RETRY_CODES or cancelled:
            item.attempts += 1
            if item.attempts < policy.max_attempts:
                scheduler.retry(item, policy.backoff(item.attempts))
                return
            if cancelled:
                response = error_response(
                    item,
                    grpc.StatusCode.UNAVAILABLE.value[0],
                    f"generation cancelled by the server ({item.attempts} tries)",
                )
        scheduler.done(item)
        await out.put(response)
