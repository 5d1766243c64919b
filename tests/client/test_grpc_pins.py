"""Pins of the installed grpc's behaviour where the client works around it.

If a grpc upgrade changes what is pinned here, a test fails and names the workaround to
revisit, instead of the workaround silently going wrong.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2_grpc as pb_grpc
from genstruct_client._batching import REQUEST_ID_KEY, sent_by_server, stream_failure_is_transient
from genstruct_service import interceptors
from genstruct_service.config import Settings
from genstruct_service.server import start_server

SERVICE = "genstruct.v1.GenstructService"
TRAILERS = ((REQUEST_ID_KEY, "r-1"),)


class StreamServer:
    """A GenerateBatch on its own threads (not this test's event loop) that ends the stream
    with `code` and the request id trailer once `end` is set; `ended` is set once it has."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.end = threading.Event()
        self.ended = threading.Event()

        def batch(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            context.add_callback(self.ended.set)
            context.send_initial_metadata(TRAILERS)
            self.end.wait(10)
            context.set_trailing_metadata(TRAILERS)
            context.abort(code, "ended by the server")
            yield b""  # never reached; a generator, as a streaming handler is

        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"GenerateBatch": grpc.stream_stream_rpc_method_handler(batch)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(2), handlers=(handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def call(self, channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall[Any, Any]:
        return channel.stream_stream(f"/{SERVICE}/GenerateBatch")()


async def test_a_write_just_after_the_server_ended_the_stream_is_grpcs_own_internal() -> None:
    """grpc/grpc#36066: a write made once the server's status has reached grpc's core, but
    before the event loop has taken it in, fails with an INTERNAL status that grpc's client
    makes up, with no trailers, and the call keeps it: the server's own status (UNAVAILABLE,
    with its request id) is lost. `sent_by_server` tells it from the server's INTERNAL, so
    generate_many reopens the stream (a draining server does this). If this fails after a
    grpc upgrade, revisit `_batching.sent_by_server` and `stream_failure_is_transient`."""
    server = StreamServer(grpc.StatusCode.UNAVAILABLE)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = server.call(channel)
            await call.initial_metadata()
            await call.write(b"first")
            server.end.set()
            # The event loop stands still (a blocking wait, on purpose) while the status
            # crosses loopback into grpc's core; then the write goes out in the same step.
            assert server.ended.wait(5)
            threading.Event().wait(0.2)
            with pytest.raises(grpc.aio.AioRpcError) as written:
                await asyncio.wait_for(call.write(b"second"), 10)
            with pytest.raises(grpc.aio.AioRpcError) as read:
                await asyncio.wait_for(call.read(), 10)
            code = await asyncio.wait_for(call.code(), 10)
    finally:
        server.server.stop(None)
    assert code == grpc.StatusCode.INTERNAL
    for error in (written.value, read.value):
        assert error.code() == grpc.StatusCode.INTERNAL, error
        assert tuple(error.trailing_metadata()) == ()
        assert not sent_by_server(error)
        assert stream_failure_is_transient(error)


async def test_an_internal_status_the_server_sent_is_not_taken_for_the_race() -> None:
    server = StreamServer(grpc.StatusCode.INTERNAL)
    server.end.set()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as read:
                await asyncio.wait_for(server.call(channel).read(), 10)
    finally:
        server.server.stop(None)
    assert read.value.code() == grpc.StatusCode.INTERNAL
    assert sent_by_server(read.value)
    assert not stream_failure_is_transient(read.value)


async def test_the_genstruct_server_sends_the_request_id_trailer_the_client_looks_for(
    settings: Settings,
) -> None:
    assert interceptors.REQUEST_ID_KEY == REQUEST_ID_KEY
    running = await start_server(settings, None)  # loading: every call is refused
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            # Nothing written, so no write can race the refusal.
            call = pb_grpc.GenstructServiceStub(channel).GenerateBatch()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 10)
    finally:
        await running.stop(None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sent_by_server(info.value)
    assert stream_failure_is_transient(info.value)
