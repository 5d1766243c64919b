"""Draining: health NOT_SERVING, new work UNAVAILABLE, in-flight work finishes, exit code 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_service.metrics import Metrics
from genstruct_service.server import start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fakes import FakeEngine
from tests.service.helpers import doc, make_settings, read_log_until, read_rest

Stub = genstruct_pb2_grpc.GenstructServiceStub
ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(sys.executable).with_name("genstruct-server")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _wait_not_serving(channel: grpc.aio.Channel) -> None:
    """Wait (bounded) on the health Watch stream until the server says NOT_SERVING."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=10
    )
    async for reply in watch:
        if reply.status == NOT_SERVING:
            watch.cancel()
            return


async def test_drain_finishes_in_flight_work_and_refuses_new_work() -> None:
    engine = FakeEngine(hold=True)
    server = await start_server(make_settings(), engine, metrics=Metrics())
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = Stub(channel)
            in_flight = asyncio.ensure_future(stub.Generate(doc(id="kept"), timeout=10))

            async def one_then_wait() -> AsyncIterator[genstruct_pb2.GenerateRequest]:
                yield doc(id="batched")
                await asyncio.Event().wait()  # never closes its side

            batch = stub.GenerateBatch(one_then_wait(), timeout=10)
            await engine.wait_started(2)
            draining = asyncio.ensure_future(server.drain(10))
            await _wait_not_serving(channel)
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.Generate(doc(), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await stub.GenerateStream(doc(), timeout=5).read()
            for error in (unary.value, streamed.value):
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in (error.details() or "")
            engine.release()
            assert (await in_flight).id == "kept"
            # The batch's document in flight is answered, then the stream ends UNAVAILABLE
            # because the caller had not closed its side.
            assert (await batch.read()).id == "batched"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await batch.read()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await asyncio.wait_for(draining, 10) is True
    finally:
        await server.stop(None)
    assert engine.cancelled == []


async def test_sigterm_drains_then_exits_zero() -> None:
    assert SERVER.exists(), "genstruct-server is not installed in this environment"
    env = dict(
        os.environ,
        GENSTRUCT_ENGINE_FACTORY="tests.fakes:make_engine",
        FAKE_ENGINE_TOKEN_DELAY="0.05",  # 12 tokens: the request is in flight for ~0.6 s
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    process = await asyncio.create_subprocess_exec(
        str(SERVER), "--port", "0", "--metrics-port", "0", "--log-format", "json",
        "--drain-seconds", "20",
        cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )
    assert process.stderr is not None
    try:
        listening = await read_log_until(process.stderr, "listening")
        await read_log_until(process.stderr, "ready")
        async with grpc.aio.insecure_channel(str(listening["target"])) as channel:
            stub = Stub(channel)
            stream = stub.GenerateStream(doc(id="in-flight"), timeout=30)
            first = await stream.read()
            assert first.delta.text == "What"  # generating now
            process.send_signal(signal.SIGTERM)
            await _wait_not_serving(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(doc(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = await read_rest(stream)
            assert rest[-1].result.id == "in-flight" and rest[-1].result.pairs[0].parsed
            assert await stream.code() == grpc.StatusCode.OK
        stopped = await read_log_until(process.stderr, "stopped")
        assert stopped["drained"] is True
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_drain_that_runs_out_cancels_the_work_and_says_so() -> None:
    engine = FakeEngine(hold=True)  # the generation in flight never finishes by itself
    server = await start_server(make_settings(), engine, metrics=Metrics())
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = asyncio.ensure_future(Stub(channel).Generate(doc(id="held"), timeout=30))
            await engine.wait_started(1)
            assert await asyncio.wait_for(server.drain(0.5), 10) is False
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() in (grpc.StatusCode.CANCELLED,
                                         grpc.StatusCode.UNAVAILABLE), info.value
    finally:
        await server.stop(None)
    assert [r.content for r in engine.cancelled] == [doc().document.content]
    assert engine.finished == []


async def test_sigterm_with_work_past_the_drain_seconds_still_exits_zero() -> None:
    env = dict(
        os.environ,
        GENSTRUCT_ENGINE_FACTORY="tests.fakes:make_engine",
        FAKE_ENGINE_TOKEN_DELAY="5",  # 12 tokens: a minute, far past the drain's second
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    process = await asyncio.create_subprocess_exec(
        str(SERVER), "--port", "0", "--metrics-port", "0", "--log-format", "json",
        "--drain-seconds", "1",
        cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )
    assert process.stderr is not None
    try:
        listening = await read_log_until(process.stderr, "listening")
        await read_log_until(process.stderr, "ready")
        async with grpc.aio.insecure_channel(str(listening["target"])) as channel:
            stream = Stub(channel).GenerateStream(doc(id="too-long"), timeout=60)
            assert (await stream.read()).delta.text == "What"  # generating now
            process.send_signal(signal.SIGTERM)
            up = await read_log_until(process.stderr, "drain time is up")
            assert up["in_flight"] == 1
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_rest(stream)
            assert info.value.code() in (grpc.StatusCode.CANCELLED,
                                         grpc.StatusCode.UNAVAILABLE), info.value
        stopped = await read_log_until(process.stderr, "stopped")
        assert stopped["drained"] is False and stopped["engine_failed"] is False
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
