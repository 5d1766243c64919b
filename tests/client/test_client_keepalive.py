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
# gRPC's default server policy (two strikes) ended the connection here by the client's fifth
# ping; the call is held for eight. gRPC's client sends a ping about once a second at most,
# whatever its keepalive time, so that takes some 8 s.
PINGS = 8
HOLD_LIMIT = 60.0  # a bound on the wait for them, never a sleep


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


class PingCounter:
    """A loopback TCP proxy in front of a server that counts the HTTP/2 PING frames the client
    sends (not their acks): plain-text gRPC is HTTP/2 with prior knowledge, a 24-byte preface
    and then frames, each behind a 9-byte header (length, type, flags, stream)."""

    PING = 0x6
    ACK = 0x1

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.pings = 0
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_for_pings(self, count: int) -> None:
        while self.pings < count:
            self._changed.clear()
            await self._changed.wait()

    async def _connect(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        host, port = self.upstream.rsplit(":", 1)
        server_r, server_w = await asyncio.open_connection(host, int(port))
        for pump in (self._frames(client_r, server_w), _copy(server_r, client_w)):
            task = asyncio.create_task(pump)
            self._tasks.add(task)

    async def _frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.readexactly(24))  # the connection preface
            while True:
                header = await reader.readexactly(9)
                payload = await reader.readexactly(int.from_bytes(header[:3], "big"))
                if header[3] == self.PING and not header[4] & self.ACK:
                    self.pings += 1
                    self._changed.set()
                writer.write(header + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _hold_a_silent_call(
    settings: Settings, accepted: Keepalive, pings: int
) -> tuple[asyncio.Task[Any], bool, int]:
    """A Generate kept silent both ways, pinging every INTERVAL, to a server that accepts
    `accepted`, until the client has sent `pings` pings or the call ended; the finished task,
    whether it ended while held, and the pings the client had sent by then."""
    engine = FakeEngine(hold=True)  # a unary call sends nothing until its generation ends
    running = await start_server(settings, engine, keepalive=accepted)
    proxy = PingCounter(running.target)
    # No retries: a call broken by GOAWAY must show, not be sent again.
    config = ChannelConfig(await proxy.start(), retry=None, keepalive_seconds=INTERVAL)
    try:
        async with AsyncGenstructClient(config=config) as client:
            call = asyncio.create_task(client.generate(DOC, timeout=HOLD_LIMIT + 20))
            await engine.wait_started(1, timeout=10)
            pinged = asyncio.create_task(proxy.wait_for_pings(pings))
            await asyncio.wait({call, pinged}, timeout=HOLD_LIMIT,
                               return_when=asyncio.FIRST_COMPLETED)
            pinged.cancel()
            ended_while_held, seen = call.done(), proxy.pings
            assert ended_while_held or seen >= pings, f"{seen} pings in {HOLD_LIMIT} s"
            engine.release()
            await asyncio.wait({call}, timeout=10)
            assert call.done()
            return call, ended_while_held, seen
    finally:
        engine.release()
        await running.stop(None)
        await proxy.close()


async def test_a_silent_call_outlives_many_ping_intervals(settings: Settings) -> None:
    """Held until the client has sent PINGS pings: more than gRPC's default policy lets
    pass."""
    call, ended_while_held, seen = await _hold_a_silent_call(
        settings, Keepalive(interval=INTERVAL), PINGS
    )
    assert not ended_while_held and seen >= PINGS
    assert call.result().pairs[0].parsed


async def test_a_server_with_grpcs_default_ping_policy_ends_that_call(settings: Settings) -> None:
    """The same call against gRPC's default server policy (a ping per 5 minutes, 2 strikes)
    dies of GOAWAY "too_many_pings" before the client has sent PINGS pings: the call above
    was pinged, and the matched policy is what kept it alive."""
    call, ended_while_held, seen = await _hold_a_silent_call(
        settings, Keepalive(interval=600.0), PINGS
    )
    assert ended_while_held and 0 < seen < PINGS, seen
    with pytest.raises(grpc.aio.AioRpcError) as info:
        call.result()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "ping" in (info.value.details() or "").lower(), info.value
