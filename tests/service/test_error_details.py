"""Every refusal carries google.rpc.Status details: ErrorInfo's reason and figures, the field
in BadRequest, RetryInfo where the server knows the wait; in the trailer of unary and
streaming calls alike, and in a GenerateBatch document's `error`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_service.errors import QueueFull
from genstruct_service.metrics import Metrics
from genstruct_service.server import RunningServer, start_server
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.fakes import FakeEngine
from tests.service.helpers import doc, make_settings

Stub = genstruct_pb2_grpc.GenstructServiceStub
SP = genstruct_pb2.SamplingParams
CHUNK = genstruct_pb2.TRUNCATION_CHUNK


class Details:
    """What a test reads from a google.rpc.Status."""

    def __init__(self, status: status_pb2.Status | None) -> None:
        assert status is not None, "no grpc-status-details-bin"
        self.status = status
        self.info: error_details_pb2.ErrorInfo | None = None
        self.fields: list[str] = []
        self.descriptions: list[str] = []
        self.retry_delay: float | None = None
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                self.info = error_details_pb2.ErrorInfo()
                detail.Unpack(self.info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.fields += [v.field for v in bad.field_violations]
                self.descriptions += [v.description for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                self.retry_delay = retry.retry_delay.ToNanoseconds() / 1e9

    @classmethod
    def of(cls, error: grpc.aio.AioRpcError) -> Details:
        return cls(rpc_status.from_call(error))  # type: ignore[arg-type]

    @property
    def reason(self) -> str:
        assert self.info is not None, "no ErrorInfo"
        assert self.info.domain == "genstruct.v1"
        return self.info.reason

    @property
    def metadata(self) -> dict[str, str]:
        assert self.info is not None
        return dict(self.info.metadata)


async def _wait_not_serving(channel: grpc.aio.Channel) -> None:
    """Wait (bounded) on the health Watch stream until the server says NOT_SERVING."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=10
    )
    async for reply in watch:
        if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            watch.cancel()
            return


async def _unary(stub: Stub, request: genstruct_pb2.GenerateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request, timeout=5)
    return info.value


async def _streamed(stub: Stub, request: genstruct_pb2.GenerateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.GenerateStream(request, timeout=5):
            pass
    return info.value


async def _batched(stub: Stub, *requests: genstruct_pb2.GenerateRequest
                   ) -> list[genstruct_pb2.GenerateResponse]:
    async def send() -> AsyncIterator[genstruct_pb2.GenerateRequest]:
        for request in requests:
            yield request

    return [r async for r in stub.GenerateBatch(send(), timeout=5)]


@pytest.mark.parametrize(
    "request_, field, value, limit",
    [
        (doc(content="x" * 100_001), "document.content", "100001", "100000"),
        (doc(sampling=SP(max_tokens=5000)), "sampling.max_tokens", "5000", "2048"),
        (doc(sampling=SP(stop=["ok", ""])), "sampling.stop[1]", None, None),
        (doc(sampling=SP(temperature=9.0)), "sampling.temperature", "9.0", None),
        (doc(chunk_tokens=3), "chunk_tokens", "3", "16"),
    ],
)
async def test_a_bad_field_is_named_in_bad_request_with_its_figures(
    stub: Stub, request_: genstruct_pb2.GenerateRequest, field: str, value: str | None,
    limit: str | None,
) -> None:
    request_.id = "doc-1"
    [item] = await _batched(stub, request_)
    item_details = Details(item.error)
    for error in (await _unary(stub, request_), await _streamed(stub, request_)):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = Details.of(error)
        for got in (details, item_details):
            assert got.reason == "FIELD_INVALID"
            assert got.fields == [field]
            # the message stays the sentence it was; the description is its part after the path
            assert got.status.message == f"{field}: {got.descriptions[0]}"
            assert got.metadata["field"] == field
            assert got.metadata.get("value") == value
            assert got.metadata.get("limit") == limit
            assert got.retry_delay is None  # retrying a bad field cannot help
        assert error.details() == details.status.message == item.error.message


async def test_context_overflow_names_the_content(stub: Stub, engine: FakeEngine) -> None:
    engine.context_chars = 5
    for error in (await _unary(stub, doc()), await _streamed(stub, doc())):
        details = Details.of(error)
        assert details.reason == "CONTEXT_OVERFLOW"
        assert details.fields == ["document.content"]


async def test_too_many_chunks_names_the_content_and_the_limit(stub: Stub) -> None:
    content = "The harbour wall was rebuilt in granite after the storm. " * 40
    error = await _unary(stub, doc(content, truncation=CHUNK, chunk_tokens=20))
    details = Details.of(error)
    assert details.reason == "TOO_MANY_CHUNKS"
    assert details.fields == ["document.content"]
    assert details.metadata["limit"] == str(make_settings().max_chunks)
    assert details.metadata["chunkTokens"] == "20"


async def test_a_malformed_message_is_refused_with_its_reason(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        generate = channel.unary_unary("/genstruct.v1.GenstructService/Generate")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(b"\x0a\x02\xff\xfe", timeout=5)  # id: two bytes that are not UTF-8
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = Details.of(info.value)
    assert details.reason == "MESSAGE_MALFORMED" and details.fields == []


async def test_a_full_queue_says_what_is_held_and_how_long_to_wait() -> None:
    engine = FakeEngine(hold=True, n_parallel=8, max_queue=256)
    settings = make_settings(max_queue=1, n_parallel=1, max_num_generations=1,
                             queue_share_per_connection=1.0)
    server = await start_server(settings, engine, metrics=Metrics())
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = Stub(channel)

            async def fill() -> list[asyncio.Future[genstruct_pb2.GenerateResponse]]:
                held = [asyncio.ensure_future(stub.Generate(doc(id=f"d{i}"), timeout=20))
                        for i in range(2)]
                await engine.wait_for(lambda e: e.started + e.queued >= 2)
                return held

            held = await fill()
            error = await _unary(stub, doc(id="third"))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = Details.of(error)
            assert details.reason == "QUEUE_FULL"
            assert details.metadata == {"held": "2", "limit": "2", "scope": "server"}
            assert details.retry_delay is None  # no document answered yet: no measure
            # two answers, the first while the other was still held, measure the pace
            engine.release()
            await asyncio.gather(*held)
            engine.hold()
            held = await fill()
            for error in (await _unary(stub, doc(id="4")), await _streamed(stub, doc(id="5"))):
                details = Details.of(error)
                assert details.reason == "QUEUE_FULL"
                assert details.retry_delay is not None and 0 < details.retry_delay <= 60
                # gRPC's own retry of unary calls waits as long
                trailers = dict(error.trailing_metadata() or ())
                assert int(trailers["grpc-retry-pushback-ms"]) == pytest.approx(
                    details.retry_delay * 1000, abs=1
                )
            [item] = await _batched(stub, doc(id="in-a-batch"))
            item_details = Details(item.error)
            assert item_details.reason == "QUEUE_FULL"
            assert item_details.retry_delay is not None
            engine.release()
            await asyncio.gather(*held)
    finally:
        engine.release()
        await server.stop(None)


async def test_the_engine_queue_refusal_carries_the_reason(
    stub: Stub, engine: FakeEngine
) -> None:
    engine.fail_next(QueueFull("the queue is full (1 requests waiting for 1 slots)"))
    assert Details.of(await _streamed(stub, doc())).reason == "QUEUE_FULL"


async def test_loading_and_draining_say_so_and_the_drain_says_how_long() -> None:
    server = await start_server(make_settings(), None, metrics=Metrics())
    engine = FakeEngine(hold=True)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = Stub(channel)
            for error in (await _unary(stub, doc()), await _streamed(stub, doc())):
                assert Details.of(error).reason == "LOADING"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=5)
            assert Details.of(info.value).reason == "LOADING"
            await server.set_engine(engine)
            in_flight = asyncio.ensure_future(stub.Generate(doc(id="kept"), timeout=20))
            await engine.wait_started(1)
            draining = asyncio.ensure_future(server.drain(30))
            await _wait_not_serving(channel)  # the server drains from then on
            for error in (await _unary(stub, doc()), await _streamed(stub, doc())):
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in (error.details() or "")
                details = Details.of(error)
                assert details.reason == "DRAINING"
                assert details.retry_delay is not None and 0 < details.retry_delay <= 30
            engine.release()
            assert (await in_flight).id == "kept"
            assert await draining
    finally:
        engine.release()
        await server.stop(None)


async def test_a_failed_engine_is_engine_failed(stub: Stub, engine: FakeEngine) -> None:
    engine.fail_engine(RuntimeError("CUDA error: an illegal memory access"))
    for error in (await _unary(stub, doc()), await _streamed(stub, doc())):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert Details.of(error).reason == "ENGINE_FAILED"
    [item] = await _batched(stub, doc(id="one"))
    assert Details(item.error).reason == "ENGINE_FAILED"


async def test_a_missing_token_is_unauthenticated() -> None:
    server = await start_server(make_settings(auth_token="s3cret"), FakeEngine())
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = Stub(channel)
            for error in (await _unary(stub, doc()), await _streamed(stub, doc())):
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization: Bearer" in (error.details() or "")
                assert Details.of(error).reason == "UNAUTHENTICATED"
    finally:
        await server.stop(None)


async def test_a_document_past_its_timeout_says_so(stub: Stub, engine: FakeEngine) -> None:
    engine.hold()
    [item] = await _batched(stub, doc(id="slow", timeout_ms=50))
    assert item.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    details = Details(item.error)
    assert details.reason == "DOCUMENT_TIMEOUT" and details.metadata["timeoutMs"] == "50"


async def test_a_bug_is_internal_error_with_the_request_id(
    stub: Stub, engine: FakeEngine
) -> None:
    engine.fail_next(RuntimeError("a bug"))
    error = await _unary(stub, doc())
    details = Details.of(error)
    assert details.reason == "INTERNAL_ERROR"
    request_id = dict(error.trailing_metadata() or ())["x-request-id"]
    assert details.metadata == {"requestId": request_id}
    assert "a bug" not in details.status.message
