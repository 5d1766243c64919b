"""Keepalive: the server accepts the pings of the client, on a long silent call too."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from genstruct_client import AsyncGenstructClient, ChannelConfig, Document
from genstruct_client.channel import KEEPALIVE, Keepalive
from genstruct_service.config import Settings
from genstruct_service.server import start_server

from tests.fakes import FakeEngine

DOC = Document(title="Tides", content="The moon pulls the sea.", id="d1")
INTERVAL = 0.2  # the client's keepalive time in these tests, and what the server accepts
# gRPC's client sends a ping about once a second at most, whatever its keepalive time, so the
# call is held for 30 intervals: some 5 pings, more than gRPC's default policy lets pass.
HELD = 30 * INTERVAL


async def test_the_server_is_built_to_accept_the_clients_ping_rate(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}  # the options the server is built with
    real_server = grpc.aio.server

    def capture(*args: Any, **kwargs: Any) -> grpc.aio.Server:
        seen.update(dict(kwargs["options"]))
        return real_server(*args, **kwargs)

    monkeypatch.setattr(grpc.aio, "server", capture)
    running = await start_server(settings, FakeEngine())
    await running.stop(None)
    client = dict(ChannelConfig().options())
    pings_every = client["grpc.keepalive_time_ms"]
    assert pings_every == KEEPALIVE.interval * 1000
    # A ping at the client's rate, even a little early, is never a strike on the server.
    assert seen["grpc.http2.min_ping_interval_without_data_ms"] <= pings_every / 2
    assert seen["grpc.http2.max_ping_strikes"] > 0  # abusive peers are still cut off
    # Pings only with calls in flight, on both sides; and on a silent call they go on.
    assert client["grpc.keepalive_permit_without_calls"] == 0
    assert seen["grpc.keepalive_permit_without_calls"] == 0
    assert client["grpc.http2.max_pings_without_data"] == 0


async def _hold_a_silent_call(
    settings: Settings, accepted: Keepalive, hold: float
) -> tuple[asyncio.Task[Any], bool]:
    """A Generate kept silent both ways for up to `hold` seconds, pinging every INTERVAL, to
    a server that accepts `accepted`; its finished task, and whether it ended while held."""
    engine = FakeEngine(hold=True)  # a unary call sends nothing until its generation ends
    running = await start_server(settings, engine, keepalive=accepted)
    # No retries: a call broken by GOAWAY must show, not be sent again.
    config = ChannelConfig(running.target, retry=None, keepalive_seconds=INTERVAL)
    try:
        async with AsyncGenstructClient(config=config) as client:
            call = asyncio.create_task(client.generate(DOC, timeout=hold + 20))
            await engine.wait_started(1, timeout=10)
            await asyncio.wait({call}, timeout=hold)
            ended_while_held = call.done()
            engine.release()
            await asyncio.wait({call}, timeout=10)
            assert call.done()
            return call, ended_while_held
    finally:
        engine.release()
        await running.stop(None)


async def test_a_silent_call_outlives_many_ping_intervals(settings: Settings) -> None:
    call, ended_while_held = await _hold_a_silent_call(
        settings, Keepalive(interval=INTERVAL), HELD
    )
    assert not ended_while_held
    assert call.result().pairs[0].parsed


async def test_a_server_with_grpcs_default_ping_policy_ends_that_call(settings: Settings) -> None:
    """The same call against gRPC's default server policy (a ping per 5 minutes, 2 strikes)
    dies of GOAWAY "too_many_pings" within seconds: the call above was pinged, and the
    matched policy is what kept it alive."""
    call, ended_while_held = await _hold_a_silent_call(
        settings, Keepalive(interval=600.0), 4 * HELD
    )
    assert ended_while_held
    with pytest.raises(grpc.aio.AioRpcError) as info:
        call.result()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "ping" in (info.value.details() or "").lower(), info.value
