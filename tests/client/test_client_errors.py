"""The clients raise errors that expose the server's details, and their retries honour
RetryInfo: a real server (fake engine) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2 as pb
from genstruct_client import (
    AsyncGenstructClient,
    ChannelConfig,
    Document,
    GenstructClient,
    ResubmitPolicy,
    RetryPolicy,
)
from genstruct_client.errors import ErrorDetails, FieldViolation, GenstructRpcError
from genstruct_service.errors import QueueFull
from genstruct_service.server import RunningServer

from tests.fakes import FakeEngine

EMPTY = Document(title="Empty", content="   ", id="empty")
DOC = Document(title="Tides", content="The moon pulls the sea.", id="d1")
# backoffs far shorter than the server's wait, so a wait that long is the server's
QUICK = RetryPolicy(initial_backoff=0.001, max_backoff=2.0)
WAIT = 0.5  # seconds the server asks for


def _check_bad_field(error: BaseException) -> None:
    assert isinstance(error, GenstructRpcError)
    assert isinstance(error, grpc.RpcError) and isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("document.content: is empty")  # as before
    assert error.reason == "FIELD_INVALID"
    assert error.field_violations == (
        FieldViolation("document.content", "is empty; send the document's text"),
    )
    assert error.retry_delay is None
    assert "x-request-id" in dict(error.trailing_metadata() or ())


async def test_the_asyncio_client_raises_the_details(server: RunningServer) -> None:
    async with AsyncGenstructClient(server.target) as client:
        with pytest.raises(GenstructRpcError) as unary:
            await client.generate(EMPTY, timeout=10)
        with pytest.raises(GenstructRpcError) as streamed:
            async for _ in client.generate_stream(EMPTY, timeout=10):
                pass
    _check_bad_field(unary.value)
    _check_bad_field(streamed.value)


async def test_the_sync_client_raises_the_details(server: RunningServer) -> None:
    def call() -> list[BaseException]:
        errors: list[BaseException] = []
        with GenstructClient(server.target) as client:
            with pytest.raises(GenstructRpcError) as unary:
                client.generate(EMPTY, timeout=10)
            errors.append(unary.value)
            with pytest.raises(GenstructRpcError) as streamed:
                list(client.generate_stream(EMPTY, timeout=10))
            errors.append(streamed.value)
        return errors

    for error in await asyncio.to_thread(call):
        _check_bad_field(error)


async def test_a_refusal_exposes_the_servers_retry_delay(
    server: RunningServer, engine: FakeEngine
) -> None:
    engine.fail_next(QueueFull("the queue is full", retry_after=2.0))
    async with AsyncGenstructClient(config=ChannelConfig(server.target, retry=None)) as client:
        with pytest.raises(GenstructRpcError) as info:
            await client.generate(DOC, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.reason == "QUEUE_FULL" and info.value.retry_delay == 2.0


async def _first_result(client: AsyncGenstructClient, rpc: str) -> pb.GenerateResponse:
    if rpc == "Generate":
        return await client.generate(DOC, timeout=20)
    messages = [m async for m in client.generate_stream(DOC, timeout=20)]
    return messages[-1].result


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
async def test_a_retry_waits_as_long_as_the_server_asks(
    server: RunningServer, engine: FakeEngine, rpc: str
) -> None:
    """Generate is retried by gRPC (the pushback trailer), GenerateStream by the client."""
    engine.fail_next(QueueFull("the queue is full", retry_after=WAIT))
    async with AsyncGenstructClient(config=ChannelConfig(server.target, retry=QUICK)) as client:
        started = time.monotonic()
        result = await _first_result(client, rpc)
        waited = time.monotonic() - started
    assert result.pairs[0].parsed and len(engine.requests) == 2  # refused once, retried
    assert waited >= WAIT


async def test_resubmission_waits_as_long_as_the_server_asks(
    server: RunningServer, engine: FakeEngine
) -> None:
    engine.fail_next(QueueFull("the queue is full", retry_after=WAIT))
    policy = ResubmitPolicy(initial_backoff=0.001, max_backoff=2.0)
    async with AsyncGenstructClient(server.target) as client:
        started = time.monotonic()
        [result] = [r async for r in client.generate_many([DOC], policy=policy)]
        waited = time.monotonic() - started
    assert result.pairs[0].parsed and len(engine.requests) == 2
    assert waited >= WAIT


async def test_a_document_out_of_tries_keeps_the_servers_details(
    server: RunningServer, engine: FakeEngine
) -> None:
    for _ in range(2):
        engine.fail_next(QueueFull("the queue is full", retry_after=0.01))
    policy = ResubmitPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.01)
    async with AsyncGenstructClient(server.target) as client:
        [result] = [r async for r in client.generate_many([DOC], policy=policy)]
    details = ErrorDetails.from_status(result.error)
    assert details.reason == "QUEUE_FULL" and details.retry_delay == 0.01


def test_the_clients_own_retries_cap_the_servers_wait() -> None:
    policy = RetryPolicy(initial_backoff=0.001, max_backoff=1.0)
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert policy.delay(unavailable, 1, retry_delay=0.5) == 0.5
    assert policy.delay(unavailable, 1, retry_delay=600.0) == 1.0  # no longer than max_backoff
    assert (policy.delay(unavailable, 1) or 0.0) <= 0.001
