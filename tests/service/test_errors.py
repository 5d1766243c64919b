"""Status codes for unary and streaming RPCs alike, cancellation, deadlines and a full queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_service.errors import ContextOverflow, QueueFull, Unavailable
from genstruct_service.interceptors import ServiceInterceptor
from genstruct_service.metrics import Metrics
from genstruct_service.server import RunningServer, start_server
from grpc_health.v1 import health_pb2

from tests.fakes import FakeEngine
from tests.service.helpers import doc, health_status, make_settings, scrape

Stub = genstruct_pb2_grpc.GenstructServiceStub
SP = genstruct_pb2.SamplingParams


async def _unary(stub: Stub, request: genstruct_pb2.GenerateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request, timeout=5)
    return info.value


async def _streamed(stub: Stub, request: genstruct_pb2.GenerateRequest
                    ) -> tuple[grpc.aio.AioRpcError, list[Any]]:
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in stub.GenerateStream(request, timeout=5):
            received.append(message)
    return info.value, received


@pytest.mark.parametrize(
    "request_, field, limit",
    [
        (doc(content="  \n "), "document.content", "empty"),
        (doc(content="x" * 100_001), "document.content", "100000"),
        (doc(title="t" * 2001), "document.title", "2000"),
        (doc(num_generations=9), "num_generations", "8"),
        (doc(id="i" * 257), "id", "256"),
        (doc(sampling=SP(max_tokens=0)), "sampling.max_tokens", "2048"),
        (doc(sampling=SP(max_tokens=5000)), "sampling.max_tokens", "2048"),
        (doc(sampling=SP(temperature=float("nan"))), "sampling.temperature", "5"),
        (doc(sampling=SP(top_p=0.0)), "sampling.top_p", "(0, 1]"),
        (doc(sampling=SP(top_k=1001)), "sampling.top_k", "1000"),
        (doc(sampling=SP(min_p=1.0)), "sampling.min_p", "[0, 1)"),
        (doc(sampling=SP(repeat_penalty=0.0)), "sampling.repeat_penalty", "(0, 5]"),
        (doc(sampling=SP(presence_penalty=2.5)), "sampling.presence_penalty", "[-2, 2]"),
        (doc(sampling=SP(frequency_penalty=-3)), "sampling.frequency_penalty", "[-2, 2]"),
        (doc(sampling=SP(seed=2**32)), "sampling.seed", "2^32"),
        (doc(sampling=SP(stop=["a"] * 9)), "sampling.stop", "8"),
        (doc(sampling=SP(stop=["ok", ""])), "sampling.stop[1]", "empty"),
        (doc(sampling=SP(stop=["s" * 65])), "sampling.stop[0]", "64"),
    ],
)
async def test_invalid_requests_name_the_field_and_the_limit(
    stub: Stub, engine: FakeEngine, request_: genstruct_pb2.GenerateRequest, field: str,
    limit: str,
) -> None:
    for error in (await _unary(stub, request_), (await _streamed(stub, request_))[0]):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith(f"{field}: ")
        assert limit in error.details()
    assert engine.requests == []  # refused before reaching the engine


async def test_context_overflow_is_invalid_argument(stub: Stub, engine: FakeEngine) -> None:
    engine.context_chars = 5
    error = await _unary(stub, doc())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncation" in error.details()


@pytest.mark.parametrize(
    "raised, code",
    [
        (QueueFull("the queue is full; retry later"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable("the engine is shutting down"), grpc.StatusCode.UNAVAILABLE),
        (ContextOverflow("document.content", "too long"), grpc.StatusCode.INVALID_ARGUMENT),
        (RuntimeError("a bug"), grpc.StatusCode.INTERNAL),
    ],
)
async def test_engine_errors_map_to_codes_before_the_first_message(
    stub: Stub, engine: FakeEngine, raised: Exception, code: grpc.StatusCode
) -> None:
    engine.fail_next(raised)
    unary = await _unary(stub, doc())
    engine.fail_next(raised)
    streamed, received = await _streamed(stub, doc())
    assert unary.code() == streamed.code() == code
    assert received == []  # a status, not a broken stream
    if code == grpc.StatusCode.INTERNAL:
        request_id = dict(unary.trailing_metadata() or ())["x-request-id"]
        assert request_id in unary.details() and "a bug" not in unary.details()
    else:
        assert str(raised) in unary.details()


async def test_a_full_queue_is_resource_exhausted(metrics: Metrics) -> None:
    engine = FakeEngine(n_parallel=1, max_queue=0, hold=True)
    server = await start_server(make_settings(), engine, metrics=metrics)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = Stub(channel)
            first = asyncio.ensure_future(stub.Generate(doc(), timeout=5))
            await engine.wait_started(1)
            error = await _unary(stub, doc())
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            engine.release()
            assert (await first).pairs[0].parsed
    finally:
        await server.stop(None)


async def test_unavailable_while_loading_then_serving(metrics: Metrics) -> None:
    server = await start_server(make_settings(), None, metrics=metrics)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = Stub(channel)
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert await health_status(channel) == not_serving
            assert await health_status(channel, "genstruct.v1.GenstructService") == not_serving
            for error in (
                await _unary(stub, doc()),
                (await _streamed(stub, doc()))[0],
            ):
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "loading" in error.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await server.set_engine(FakeEngine())
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            assert (await stub.Generate(doc(), timeout=5)).pairs[0].parsed
    finally:
        await server.stop(None)


async def test_cancelling_a_stream_midway_frees_the_slot(
    stub: Stub, engine: FakeEngine, server: RunningServer
) -> None:
    engine.hold()
    call = stub.GenerateStream(doc(id="c"), timeout=10)
    first = await call.read()
    assert first.delta.text == "What"
    assert engine.stats().busy_slots == 1
    assert (await scrape(server))["genstruct_busy_slots"] == 1
    call.cancel()
    await engine.wait_idle()
    assert len(engine.cancelled) == 1 and engine.finished == []
    assert (await scrape(server))["genstruct_busy_slots"] == 0
    assert await server.state.wait_idle(5)


async def test_cancelling_a_stream_the_caller_does_not_read_frees_the_slot() -> None:
    # 2,000 deltas of 16 KiB: far more than flow control lets through to a caller that reads
    # one message, so the handler is held at a write (not in the engine) when cancelled.
    engine = FakeEngine(tokens=["x" * 16384] * 2000)
    server = await start_server(make_settings(max_message_bytes=1 << 20), engine)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = Stub(channel).GenerateStream(doc(sampling=SP(max_tokens=2000)), timeout=30)
            await call.read()
            await engine.wait_for(lambda e: e.deltas >= 64)  # over a megabyte produced
            call.cancel()
            await engine.wait_idle()
            assert len(engine.cancelled) == 1 and engine.finished == []
    finally:
        await server.stop(None)


async def test_cancelling_a_unary_call_frees_the_slot(stub: Stub, engine: FakeEngine) -> None:
    engine.hold()
    call = stub.Generate(doc(), timeout=10)
    await engine.wait_started(1)
    call.cancel()
    await engine.wait_idle()
    assert len(engine.cancelled) == 1


async def test_cancelling_a_batch_frees_every_slot(stub: Stub, engine: FakeEngine) -> None:
    engine.hold()

    async def forever() -> AsyncIterator[genstruct_pb2.GenerateRequest]:
        for i in range(3):
            yield doc(id=str(i))
        await asyncio.Event().wait()  # the caller keeps its side open

    call = stub.GenerateBatch(forever(), timeout=10)
    await engine.wait_started(3)
    call.cancel()
    await engine.wait_idle()
    assert len(engine.cancelled) == 3


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
async def test_a_deadline_stops_the_generation(
    stub: Stub, engine: FakeEngine, server: RunningServer, method: str
) -> None:
    engine.hold()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if method == "Generate":
            await stub.Generate(doc(), timeout=0.3)
        else:
            async for _ in stub.GenerateStream(doc(), timeout=0.3):
                pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await engine.wait_idle()
    assert len(engine.cancelled) == 1
    assert await server.state.wait_idle(5)


async def test_messages_over_the_size_limit_are_refused(metrics: Metrics) -> None:
    server = await start_server(
        make_settings(max_message_bytes=2048), FakeEngine(), metrics=metrics
    )
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            error = await _unary(Stub(channel), doc(content="x" * 4096))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(None)


# --- the interceptor on handlers that set their own status ------------------------------------


async def _aborting_unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError("abort returns only by raising")


async def _aborting_stream(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    yield b"one"
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stop here")


async def _set_code(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    context.set_code(grpc.StatusCode.ALREADY_EXISTS)
    context.set_details("exists")
    return b""


async def test_the_interceptor_keeps_a_status_the_handler_set() -> None:
    metrics = Metrics()
    server = grpc.aio.server(interceptors=[ServiceInterceptor(metrics)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "genstruct.v1.GenstructService",
                {
                    "A": grpc.unary_unary_rpc_method_handler(_aborting_unary),
                    "B": grpc.unary_stream_rpc_method_handler(_aborting_stream),
                    "C": grpc.unary_unary_rpc_method_handler(_set_code),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            prefix = "/genstruct.v1.GenstructService/"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(prefix + "A")(b"", timeout=5)
            assert (info.value.code(), info.value.details()) == (
                grpc.StatusCode.NOT_FOUND, "no such thing"
            )
            call = channel.unary_stream(prefix + "B")(b"", timeout=5)
            assert await call.read() == b"one"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(prefix + "C")(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        await server.stop(None)
    counted = metrics.requests.collect()[0].samples
    codes = {s.labels["code"] for s in counted if s.name.endswith("_total")}
    assert codes == {"NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS"}


async def test_generations_take_slots_as_in_the_real_engine(metrics: Metrics) -> None:
    """Three generations hold three of four slots; a request of two waits, one of one goes
    past it into the last slot, and the waiting one starts when slots come back."""
    engine = FakeEngine(n_parallel=4, hold=True)
    server = await start_server(make_settings(n_parallel=4), engine, metrics=metrics,
                                metrics_port=0)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = Stub(channel)
            three = asyncio.ensure_future(stub.Generate(doc(num_generations=3), timeout=10))
            await engine.wait_started(1)
            two = asyncio.ensure_future(stub.Generate(doc(num_generations=2), timeout=10))
            await engine.wait_for(lambda e: e.queued == 1)
            one = asyncio.ensure_future(stub.Generate(doc(), timeout=10))
            await engine.wait_started(2)
            assert engine.stats().busy_slots == 4 and engine.stats().queued == 1
            # what an autoscaler reads: one document waiting, every slot busy
            samples = await scrape(server)
            assert samples["genstruct_queue_depth"] == 1
            assert samples["genstruct_busy_slots"] == 4
            engine.release()
            results = await asyncio.gather(three, two, one)
            assert [len(r.pairs) for r in results] == [3, 2, 1]
            assert [r.num_generations for r in engine.requests] == [3, 2, 1]
            assert engine.finished[-1].num_generations == 2  # it waited, then ran
    finally:
        await server.stop(None)
