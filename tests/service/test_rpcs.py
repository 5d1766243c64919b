"""Every RPC through a real gRPC server (127.0.0.1, port 0) with the fake engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import genstruct_service
import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_service.server import RunningServer
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.fakes import DEFAULT_TOKENS, FakeEngine
from tests.service.helpers import doc, health_status, read_rest, scrape

Stub = genstruct_pb2_grpc.GenstructServiceStub
FULL_TEXT = "".join(DEFAULT_TOKENS)


async def test_generate_returns_parsed_pairs_and_the_request_id(
    stub: Stub, engine: FakeEngine
) -> None:
    call = stub.Generate(
        doc(id="doc-1", num_generations=3), metadata=(("x-request-id", "req-42"),), timeout=5
    )
    response = await call
    assert response.id == "doc-1"
    assert response.model_name == "fake-model:Q4_K_M"
    assert [p.index for p in response.pairs] == [0, 1, 2]
    pair = response.pairs[0]
    assert pair.parsed and pair.user == "What is the document about?"
    assert pair.assistant == "It is about testing."
    assert pair.raw_text == FULL_TEXT
    assert pair.finish_reason == genstruct_pb2.FINISH_REASON_EOS
    assert pair.completion_tokens == len(DEFAULT_TOKENS)
    assert response.usage.completion_tokens == 3 * len(DEFAULT_TOKENS)
    assert response.usage.prompt_tokens > 0
    assert response.timings.total_ms >= response.timings.time_to_first_token_ms >= 0
    # Trailers only: early headers would stop gRPC's own retries of a unary call.
    assert ("x-request-id", "req-42") not in tuple(await call.initial_metadata())
    assert ("x-request-id", "req-42") in tuple(await call.trailing_metadata())
    # Server defaults filled in what the request left unset.
    assert engine.requests[0].sampling.max_tokens == 512
    assert engine.requests[0].sampling.temperature == pytest.approx(0.7)


async def test_a_request_without_id_gets_a_fresh_one(stub: Stub) -> None:
    call = stub.Generate(doc(), timeout=5)
    await call
    ids = [v for k, v in await call.trailing_metadata() if k == "x-request-id"]
    assert len(ids) == 1 and len(ids[0]) == 32


async def test_streams_send_the_request_id_as_a_header_too(stub: Stub) -> None:
    """A stream's caller can tie its logs to the server's before the stream ends."""
    sent = (("x-request-id", "req-stream"),)
    stream = stub.GenerateStream(doc(id="s"), metadata=sent, timeout=5)
    batch = stub.GenerateBatch(_requests([doc(id="b")]), metadata=sent, timeout=5)
    for call in (stream, batch):
        assert ("x-request-id", "req-stream") in tuple(await call.initial_metadata())
        await read_rest(call)
        assert ("x-request-id", "req-stream") in tuple(await call.trailing_metadata())
    # without one of its own, the fresh id in the header is the one in the trailer
    fresh = stub.GenerateStream(doc(), timeout=5)
    header = [v for k, v in await fresh.initial_metadata() if k == "x-request-id"]
    await read_rest(fresh)
    trailer = [v for k, v in await fresh.trailing_metadata() if k == "x-request-id"]
    assert len(header) == 1 and header == trailer


async def test_sampling_reaches_the_engine(stub: Stub, engine: FakeEngine) -> None:
    sampling = genstruct_pb2.SamplingParams(
        temperature=0.0, top_k=40, seed=7, max_tokens=4, stop=["\n\n"]
    )
    response = await stub.Generate(doc(sampling=sampling), timeout=5)
    sent = engine.requests[0].sampling
    assert (sent.temperature, sent.top_k, sent.seed, sent.max_tokens, sent.stop) == (
        0.0, 40, 7, 4, ("\n\n",)
    )
    # Cut at max_tokens: before the assistant marker, so the pair does not parse.
    pair = response.pairs[0]
    assert pair.finish_reason == genstruct_pb2.FINISH_REASON_LENGTH
    assert not pair.parsed and pair.user == "" and pair.raw_text == "".join(DEFAULT_TOKENS[:4])


async def test_generate_stream_sends_deltas_then_one_result(stub: Stub) -> None:
    messages = [m async for m in stub.GenerateStream(doc(id="s1", num_generations=2), timeout=5)]
    *deltas, last = messages
    assert all(m.WhichOneof("event") == "delta" and m.id == "s1" for m in deltas)
    assert last.WhichOneof("event") == "result" and last.id == "s1"
    for index in (0, 1):
        text = "".join(m.delta.text for m in deltas if m.delta.index == index)
        assert text == FULL_TEXT == last.result.pairs[index].raw_text
    assert last.result.pairs[0].parsed


async def _requests(
    items: list[genstruct_pb2.GenerateRequest],
) -> AsyncIterator[genstruct_pb2.GenerateRequest]:
    for item in items:
        yield item


async def test_generate_batch_answers_every_document_by_id(stub: Stub) -> None:
    items = [doc(id=f"d{i}", content=f"Document number {i}.") for i in range(10)]
    responses = [r async for r in stub.GenerateBatch(_requests(items), timeout=10)]
    assert sorted(r.id for r in responses) == sorted(f"d{i}" for i in range(10))
    assert all(r.pairs[0].parsed and not r.HasField("error") for r in responses)


async def test_a_bad_document_gets_its_own_error_and_the_batch_goes_on(
    stub: Stub, engine: FakeEngine
) -> None:
    engine.hold()  # keep "a" in flight while its duplicate arrives
    items = [
        doc(id="a"),
        doc(id="empty", content="   "),
        doc(content="no id"),
        doc(id="a"),
        doc(id="b", num_generations=99),
        doc(id="c"),
    ]
    call = stub.GenerateBatch(_requests(items), timeout=10)
    errors = {}
    for _ in range(4):  # the four refusals come back while "a" and "c" are held
        response = await call.read()
        assert response.HasField("error")
        errors[response.id] = response.error
    engine.release()
    finished = await read_rest(call)
    assert sorted(r.id for r in finished) == ["a", "c"]
    assert all(not r.HasField("error") for r in finished)
    assert errors.keys() == {"empty", "", "a", "b"}
    assert all(e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for e in errors.values())
    assert "document.content" in errors["empty"].message
    assert errors[""].message.startswith("id:")
    assert "already in flight" in errors["a"].message
    assert "num_generations" in errors["b"].message and "8" in errors["b"].message
    assert await call.code() == grpc.StatusCode.OK


async def test_engine_refusals_become_item_errors(stub: Stub, engine: FakeEngine) -> None:
    from genstruct_service.errors import QueueFull

    engine.fail_next(QueueFull("the queue is full"))
    responses = [r async for r in stub.GenerateBatch(_requests([doc(id="x")]), timeout=5)]
    assert len(responses) == 1
    assert responses[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "queue is full" in responses[0].error.message


async def test_a_document_past_its_timeout_ms_fails_alone(
    stub: Stub, engine: FakeEngine
) -> None:
    engine.hold()  # "late" never finishes; "quick" has one token, so it is never held
    late = doc(id="late")
    late.timeout_ms = 200
    quick = doc(id="quick")
    quick.sampling.max_tokens = 1
    call = stub.GenerateBatch(_requests([late, quick]), timeout=10)
    responses = {r.id: r for r in await read_rest(call)}
    assert responses["late"].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "timeout_ms (200)" in responses["late"].error.message
    assert not responses["quick"].HasField("error")
    assert await call.code() == grpc.StatusCode.OK  # the stream itself went on
    await engine.wait_for(lambda e: [r.content for r in e.cancelled] == [late.document.content])


async def test_batch_reads_no_more_than_the_in_flight_limit(
    stub: Stub, engine: FakeEngine, server: RunningServer
) -> None:
    limit = server.settings.max_batch_in_flight
    engine.hold()
    # The document after the held ones is refused at once when read; while the held ones fill
    # every permit it must not be read at all.
    items = [doc(id=f"held{i}") for i in range(limit)] + [doc(id="bad", content="")]
    call = stub.GenerateBatch(_requests(items), timeout=10)
    await engine.wait_started(limit)
    assert len(engine.requests) == limit
    engine.release()
    responses = await read_rest(call)
    expected = [*(f"held{i}" for i in range(limit)), "bad"]
    assert sorted(r.id for r in responses) == sorted(expected)
    # Read while the held ones filled every permit, "bad" would have been answered at once,
    # ahead of them all; it was read only once a held one's answer had given a permit back.
    assert responses[0].id != "bad", [r.id for r in responses]


async def test_get_model_info(stub: Stub, server: RunningServer) -> None:
    info = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=5)
    assert info.model_name == "fake-model:Q4_K_M"
    assert info.model_file == "fake-model.Q4_K_M.gguf"
    assert info.service_version == genstruct_service.__version__
    assert info.n_parallel == 4 and info.backend == "CPU"
    assert info.default_sampling.max_tokens == server.settings.default_max_tokens
    assert info.default_sampling.HasField("temperature")
    assert not info.default_sampling.HasField("seed")
    # Each generation takes a slot: the limit is min(max_num_generations 8, n_parallel 4).
    assert info.limits.max_num_generations == server.settings.n_parallel == 4
    assert info.limits.max_batch_in_flight == server.settings.max_batch_in_flight
    assert info.limits.max_message_bytes == server.settings.max_message_bytes


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health_status(channel) == serving
    assert await health_status(channel, "genstruct.v1.GenstructService") == serving
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    replies = [r async for r in stub.ServerReflectionInfo(ask(), timeout=5)]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"genstruct.v1.GenstructService", "grpc.health.v1.Health"} <= names


async def test_metrics_count_requests_tokens_and_steps(
    stub: Stub, server: RunningServer
) -> None:
    await stub.Generate(doc(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Generate(doc(content=""), timeout=5)
    samples = await scrape(server)
    assert samples['genstruct_requests_total{code="OK",method="Generate"}'] == 1
    assert samples['genstruct_requests_total{code="INVALID_ARGUMENT",method="Generate"}'] == 1
    assert samples["genstruct_generated_tokens_total"] == len(DEFAULT_TOKENS)
    assert samples["genstruct_prompt_tokens_total"] > 0
    assert samples["genstruct_decode_batch_tokens_count"] == len(DEFAULT_TOKENS)
    assert samples["genstruct_time_to_first_token_seconds_count"] == 1
    assert samples['genstruct_request_duration_seconds_count{method="Generate"}'] == 2
    assert samples["genstruct_busy_slots"] == 0 and samples["genstruct_slots"] == 4


async def test_parse_failures_and_truncations_are_counted(
    stub: Stub, server: RunningServer, engine: FakeEngine
) -> None:
    engine.context_chars = 10
    response = await stub.Generate(
        doc(truncation=genstruct_pb2.TRUNCATION_TRUNCATE,
            sampling=genstruct_pb2.SamplingParams(max_tokens=3)),
        timeout=5,
    )
    assert response.truncated and not response.pairs[0].parsed
    samples = await scrape(server)
    assert samples["genstruct_truncations_total"] == 1
    assert samples["genstruct_parse_failures_total"] == 1


async def test_calls_are_logged_without_the_document_text(
    stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    secret = "Confidential tidal content."
    await stub.Generate(doc(content=secret), metadata=(("x-request-id", "log-1"),), timeout=5)
    records = [r for r in caplog.records if getattr(r, "request_id", None) == "log-1"]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.INFO
    assert (record.method, record.code) == ("Generate", "OK")  # type: ignore[attr-defined]
    assert record.completion_tokens == len(DEFAULT_TOKENS)  # type: ignore[attr-defined]
    assert record.duration_ms >= 0  # type: ignore[attr-defined]
    assert all(secret not in r.getMessage() and secret not in str(vars(r))
               for r in caplog.records if r.levelno >= logging.INFO)
