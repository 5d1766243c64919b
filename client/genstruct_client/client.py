"""The synchronous client of the Genstruct service."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType

import grpc
from genstruct.v1 import genstruct_pb2 as pb
from genstruct.v1 import genstruct_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2_grpc

from genstruct_client._batching import ResubmitPolicy
from genstruct_client._calls import (
    StreamAttempts,
    Target,
    client_config,
    health_request,
    status_name,
)
from genstruct_client.aio import AsyncGenstructClient
from genstruct_client.channel import ChannelConfig, create_channel
from genstruct_client.errors import rich_error
from genstruct_client.types import GenerationOptions, RequestLike, to_request

_Outcome = pb.GenerateResponse | BaseException | None


class GenstructClient:
    """Calls a Genstruct service (or several, round_robin) from synchronous code.

    Use it as `with GenstructClient("127.0.0.1:50051") as client:`. `timeout` arguments are
    deadlines in seconds. Calls refused with UNAVAILABLE or RESOURCE_EXHAUSTED are retried,
    each in one layer (see RetryPolicy). A failed call raises GenstructRpcError (a
    grpc.RpcError) with the server's `reason`, `field_violations` and `retry_delay`.
    """

    def __init__(self, target: Target = None, *, config: ChannelConfig | None = None) -> None:
        self.config = config = client_config(target, config)
        self._metadata = config.metadata()
        self._channel = create_channel(config)
        self._stub = pb_grpc.GenstructServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> GenstructClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float) -> None:
        """Waits until the channel has connected (grpc.FutureTimeoutError otherwise)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def generate(
        self,
        document: RequestLike,
        options: GenerationOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.GenerateResponse:
        """Pairs for one document (a Document with `options`, or a ready GenerateRequest)."""
        request = to_request(document, options)
        try:
            return self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rich_error(exc) from None

    def generate_stream(
        self,
        document: RequestLike,
        options: GenerationOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Text deltas as they are generated, then one message with the result.

        Closing the iterator early cancels the call and frees the server's slot. Refusals are
        retried here until the first message: gRPC's retry ends at the stream's headers.
        """
        request = to_request(document, options)
        attempts = StreamAttempts(self.config, timeout)
        for left in attempts:
            call = self._stub.GenerateStream(request, timeout=left, metadata=self._metadata)
            try:
                for message in call:
                    attempts.received = True
                    yield message
                return
            except grpc.RpcError as exc:
                attempts.failed(exc)
            finally:
                call.cancel()  # type: ignore[no-untyped-call]

    def generate_batch(
        self, requests: Iterable[pb.GenerateRequest], *, timeout: float | None = None
    ) -> Iterator[pb.GenerateResponse]:
        """The raw GenerateBatch stream: results in the order they finish, matched by id.

        No resubmission on failure; `generate_many` does that.
        """
        call = self._stub.GenerateBatch(iter(requests), timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise rich_error(exc) from None
        finally:
            call.cancel()  # type: ignore[no-untyped-call]

    def model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        """The loaded model and the server's limits and defaults."""
        try:
            return self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise rich_error(exc) from None

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The health status name ("SERVING", "NOT_SERVING", ...) of `service` ("" = server)."""
        request = health_request(service)
        response = self._health.Check(request, timeout=timeout, metadata=self._metadata)
        return status_name(response)

    def generate_many(
        self,
        documents: Iterable[RequestLike],
        options: GenerationOptions | None = None,
        *,
        window: int = 32,
        streams: int = 1,
        deadline: float | None = None,
        policy: ResubmitPolicy | None = None,
    ) -> Iterator[pb.GenerateResponse]:
        """Results for many documents as they finish; see AsyncGenstructClient.generate_many.

        Runs the asyncio implementation on a private thread; `documents` is read there.
        Closing the iterator early stops the work.
        """
        results: queue.Queue[_Outcome] = queue.Queue(maxsize=window * streams)
        loop = asyncio.new_event_loop()

        async def produce() -> None:
            try:
                async with AsyncGenstructClient(config=self.config) as client:
                    batch = client.generate_many(
                        documents,
                        options,
                        window=window,
                        streams=streams,
                        deadline=deadline,
                        policy=policy,
                    )
                    async with contextlib.aclosing(batch):
                        async for response in batch:
                            await asyncio.to_thread(results.put, response)
            except BaseException as exc:  # handed to the consuming thread
                results.put(exc)
            else:
                results.put(None)

        task = loop.create_task(produce())

        def run() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)

        thread = threading.Thread(target=run, name="genstruct-many", daemon=True)
        thread.start()
        try:
            while True:
                outcome = results.get()
                if outcome is None:
                    return
                if isinstance(outcome, BaseException):
                    raise outcome
                yield outcome
        finally:
            if not task.done():
                loop.call_soon_threadsafe(task.cancel)
            while thread.is_alive():  # unblock a pending put so the cancel lands
                with contextlib.suppress(queue.Empty):
                    results.get(timeout=0.1)
            thread.join()
            loop.close()
