"""How many times one refused call runs on the server: one retry layer, throttled.

A real server (fake engine) on 127.0.0.1 that refuses every request. Each run of a handler
hands the engine one request before the refusal goes out, so the engine's count of requests
is how many attempts reached the server.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from genstruct_client import (
    AsyncGenstructClient,
    ChannelConfig,
    Document,
    GenstructClient,
    RetryPolicy,
)
from genstruct_client.channel import UNARY_METHODS
from genstruct_service.config import Settings
from genstruct_service.errors import QueueFull, Unavailable
from genstruct_service.server import RunningServer, start_server

from tests.fakes import FakeEngine

DOC = Document(title="Tides", content="The moon pulls the sea.", id="d1")
REFUSALS = {
    "UNAVAILABLE": lambda: Unavailable("the server is shutting down"),
    "RESOURCE_EXHAUSTED": lambda: QueueFull("the queue is full"),
}
# Short backoffs keep the test quick; attempts and throttling are the defaults.
POLICY = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)


def test_the_service_config_retries_unary_methods_only_and_throttles() -> None:
    config = json.loads(ChannelConfig(retry=POLICY).service_config())
    (method_config,) = config["methodConfig"]
    names = {(name["service"], name.get("method")) for name in method_config["name"]}
    assert names == set(UNARY_METHODS) == {
        ("genstruct.v1.GenstructService", "Generate"),
        ("genstruct.v1.GenstructService", "GetModelInfo"),
        ("grpc.health.v1.Health", "Check"),
    }
    assert method_config["retryPolicy"]["maxAttempts"] == 5
    assert config["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}
    bare = json.loads(ChannelConfig(retry=None).service_config())
    assert "methodConfig" not in bare and "retryThrottling" not in bare


async def _refused_generates(
    server: RunningServer, engine: FakeEngine, refusal: BaseException, document: Document = DOC
) -> list[tuple[str, int]]:
    """Two Generate calls of a new asyncio client (full throttle tokens) refused with
    `refusal`: for each, its status and how many times the server ran it."""
    engine.refuse(refusal)
    outcomes = []
    async with AsyncGenstructClient(config=ChannelConfig(server.target, retry=POLICY)) as client:
        for _ in range(2):
            before = len(engine.requests)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate(document, timeout=30)
            outcomes.append((info.value.code().name, len(engine.requests) - before))
    return outcomes


def _refused_generates_sync(
    server: RunningServer, engine: FakeEngine, refusal: BaseException
) -> list[tuple[str, int]]:
    """The same with the sync client (on a thread of its own: it blocks)."""
    engine.refuse(refusal)
    outcomes = []
    with GenstructClient(config=ChannelConfig(server.target, retry=POLICY)) as client:
        for _ in range(2):
            before = len(engine.requests)
            with pytest.raises(grpc.RpcError) as info:
                client.generate(DOC, timeout=30)
            outcomes.append((info.value.code().name, len(engine.requests) - before))
    return outcomes


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize("refusal", sorted(REFUSALS))
async def test_a_refused_generate_runs_max_attempts_times_then_is_throttled(
    server: RunningServer, engine: FakeEngine, refusal: str, sync: bool
) -> None:
    error = REFUSALS[refusal]()
    if sync:
        outcomes = await asyncio.to_thread(_refused_generates_sync, server, engine, error)
    else:
        outcomes = await _refused_generates(server, engine, error)
    # gRPC's attempts (5, not 5 x 5 with a retry loop of the client's on top), then one: the
    # failures have used up half of the throttle's tokens.
    assert outcomes == [(refusal, POLICY.max_attempts), (refusal, 1)]


async def test_a_large_refused_document_is_retried_too(
    settings: Settings, engine: FakeEngine
) -> None:
    """Over gRPC's default retry buffer (256 KiB), a call would be sent once."""
    roomy = await start_server(settings.model_copy(update={"max_content_chars": 200_000}), engine)
    large = Document("t", "é" * 150_000, "large")  # 300 KB of UTF-8
    try:
        outcomes = await _refused_generates(roomy, engine, QueueFull("the queue is full"), large)
    finally:
        await roomy.stop(None)
    assert outcomes[0] == ("RESOURCE_EXHAUSTED", POLICY.max_attempts)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_refused_generate_stream_runs_max_attempts_times(
    server: RunningServer, engine: FakeEngine, sync: bool
) -> None:
    """The clients' own retry until the first message, and nothing of gRPC's on top."""
    engine.refuse(QueueFull("the queue is full"))
    config = ChannelConfig(server.target, retry=POLICY)

    def stream() -> grpc.StatusCode:
        with GenstructClient(config=config) as client, pytest.raises(grpc.RpcError) as info:
            list(client.generate_stream(DOC, timeout=30))
        return info.value.code()

    if sync:
        code = await asyncio.to_thread(stream)
    else:
        async with AsyncGenstructClient(config=config) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [m async for m in client.generate_stream(DOC, timeout=30)]
        code = info.value.code()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(engine.requests) == POLICY.max_attempts


async def test_without_a_retry_policy_a_refused_call_runs_once(
    server: RunningServer, engine: FakeEngine
) -> None:
    engine.refuse(Unavailable("the server is shutting down"))
    async with AsyncGenstructClient(config=ChannelConfig(server.target, retry=None)) as client:
        with pytest.raises(grpc.aio.AioRpcError):
            await client.generate(DOC, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            _ = [m async for m in client.generate_stream(DOC, timeout=10)]
    assert [request.stream for request in engine.requests] == [False, True]  # once each
