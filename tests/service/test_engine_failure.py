"""An engine that fails for good: health NOT_SERVING at once, calls UNAVAILABLE, exit code 3."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_service.metrics import Metrics
from genstruct_service.server import SERVICE_NAME, RunningServer, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fakes import FakeEngine
from tests.service.helpers import doc, health_status, make_settings, read_log_until

Stub = genstruct_pb2_grpc.GenstructServiceStub
ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(sys.executable).with_name("genstruct-server")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAILED = "the engine failed and must be restarted"


async def _next_status(watch: grpc.aio.UnaryStreamCall[object, object]) -> int:
    reply = await asyncio.wait_for(watch.read(), 10)
    assert isinstance(reply, health_pb2.HealthCheckResponse)
    return int(reply.status)


async def test_failed_engine_turns_health_not_serving_and_calls_unavailable(
    server: RunningServer, channel: grpc.aio.Channel, stub: Stub, engine: FakeEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=20
    )
    assert await _next_status(watch) == SERVING
    engine.hold()
    in_flight = asyncio.ensure_future(stub.Generate(doc(id="in-flight"), timeout=10))
    await engine.wait_started(1)
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    with caplog.at_level(logging.ERROR, logger="genstruct_service.server"):
        engine.fail_engine(error)
        # the watcher reacts to the failure itself: the first change health reports
        assert await _next_status(watch) == NOT_SERVING
    watch.cancel()
    assert server.engine_failure is error
    assert await asyncio.wait_for(server.engine_failed(), 5) is error
    failures = [r for r in caplog.records if r.getMessage().startswith(FAILED)]
    assert failures and failures[0].levelno == logging.ERROR
    assert "illegal memory access" in failures[0].getMessage()
    for service in ("", SERVICE_NAME):
        assert await health_status(channel, service) == NOT_SERVING

    # the call in flight, so its client retries on another replica
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await in_flight
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"{FAILED}: CUDA error" in (info.value.details() or "")
    # and every call after it, whatever the RPC
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Generate(doc(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        await stub.GenerateStream(doc(), timeout=5).read()
    for failed in (unary.value, streamed.value):
        assert failed.code() == grpc.StatusCode.UNAVAILABLE
        assert f"{FAILED}: CUDA error" in (failed.details() or "")

    async def one() -> AsyncIterator[genstruct_pb2.GenerateRequest]:
        yield doc(id="batched")

    [item] = [r async for r in stub.GenerateBatch(one(), timeout=5)]
    assert item.id == "batched" and item.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert FAILED in item.error.message
    # what does not need the engine still answers
    info_reply = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=5)
    assert info_reply.model_name == engine.info.model_name


async def test_an_engine_that_failed_before_serving_is_seen_at_once() -> None:
    engine = FakeEngine()
    engine.fail_engine(RuntimeError("gone"))
    server = await start_server(make_settings(), engine, metrics=Metrics())
    try:
        assert str(await asyncio.wait_for(server.engine_failed(), 5)) == "gone"
        async with grpc.aio.insecure_channel(server.target) as channel:
            assert await health_status(channel) == NOT_SERVING
    finally:
        await server.stop(None)


async def test_a_failure_after_stop_is_not_watched(caplog: pytest.LogCaptureFixture) -> None:
    # cli.serve() stops the server before engine.close(): whatever happens then is no failure
    engine = FakeEngine()
    server = await start_server(make_settings(), engine, metrics=Metrics())
    await server.stop(None)
    with caplog.at_level(logging.ERROR, logger="genstruct_service.server"):
        engine.fail_engine(RuntimeError("while closing"))
        with pytest.raises(asyncio.CancelledError):  # the watching ended, without a failure
            await asyncio.wait_for(server.engine_failed(), 5)
    assert server.engine_failure is None
    assert not [r for r in caplog.records if r.getMessage().startswith(FAILED)]


def _server_env(**extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        GENSTRUCT_ENGINE_FACTORY="tests.fakes:make_engine",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **extra,
    )


async def _start(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    assert SERVER.exists(), "genstruct-server is not installed in this environment"
    return await asyncio.create_subprocess_exec(
        str(SERVER), "--port", "0", "--metrics-port", "0", "--log-format", "json", *args,
        cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )


async def test_genstruct_server_exits_3_after_an_engine_failure() -> None:
    # The fake fails for good once its first request completed (FAKE_ENGINE_FAIL_AFTER=1).
    process = await _start(_server_env(FAKE_ENGINE_FAIL_AFTER="1"))
    assert process.stderr is not None
    try:
        listening = await read_log_until(process.stderr, "listening")
        await read_log_until(process.stderr, "ready")
        async with grpc.aio.insecure_channel(str(listening["target"])) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=20
            )
            assert await _next_status(watch) == SERVING
            # the call that was answering when the engine failed still gets its answer
            response = await Stub(channel).Generate(doc(id="last"), timeout=10)
            assert response.id == "last" and response.pairs[0].parsed
            assert await _next_status(watch) == NOT_SERVING
            watch.cancel()
        failed = await read_log_until(process.stderr, FAILED)
        assert failed["level"] == "ERROR" and "injected fault" in str(failed["msg"])
        stopped = await read_log_until(process.stderr, "stopped")
        assert stopped["engine_failed"] is True
        assert await asyncio.wait_for(process.wait(), 30) == 3
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_drain_after_an_engine_failure_ends_within_its_5_seconds() -> None:
    """A GenerateBatch whose caller never closes its side would hold a drain for good; after
    an engine failure the drain gives up on it within FAILURE_DRAIN_SECONDS (5), whatever
    --drain-seconds says."""
    process = await _start(_server_env(FAKE_ENGINE_FAIL_AFTER="1"), "--drain-seconds", "600")
    assert process.stderr is not None
    try:
        listening = await read_log_until(process.stderr, "listening")
        await read_log_until(process.stderr, "ready")
        async with grpc.aio.insecure_channel(str(listening["target"])) as channel:

            async def one_then_wait() -> AsyncIterator[genstruct_pb2.GenerateRequest]:
                yield doc(id="last")
                await asyncio.Event().wait()  # never closes its side

            batch = Stub(channel).GenerateBatch(one_then_wait(), timeout=60)
            assert (await batch.read()).id == "last"  # its completion fails the engine
            draining = await read_log_until(process.stderr, "draining for up to 5 s")
            up = await read_log_until(process.stderr, "drain time is up")
            stopped = await read_log_until(process.stderr, "stopped")
            batch.cancel()
        assert stopped["drained"] is False and stopped["engine_failed"] is True
        waited = _seconds(up) - _seconds(draining)
        assert 4.5 <= waited <= 7, waited  # the drain waited its 5 s, and no longer
        assert await asyncio.wait_for(process.wait(), 30) == 3
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _seconds(entry: dict[str, object]) -> float:
    return datetime.fromisoformat(str(entry["ts"])).timestamp()


async def test_genstruct_server_still_exits_0_on_sigterm_with_the_watching() -> None:
    # engine.close() after the drain must not be taken for a failure
    process = await _start(_server_env())
    assert process.stderr is not None
    try:
        listening = await read_log_until(process.stderr, "listening")
        await read_log_until(process.stderr, "ready")
        async with grpc.aio.insecure_channel(str(listening["target"])) as channel:
            assert (await Stub(channel).Generate(doc(), timeout=10)).pairs[0].parsed
        process.send_signal(signal.SIGTERM)
        stopped = await read_log_until(process.stderr, "stopped")
        assert stopped["engine_failed"] is False and stopped["drained"] is True
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
