"""TRUNCATION_CHUNK through a real gRPC server with the fake engine (one token per character).

Each part becomes a request of its own to the engine; the response gathers every part's
pairs with the part's index and span, and the usage of all of them.
"""

from __future__ import annotations

import itertools

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc

from tests.fakes import FakeEngine, _prompt_tokens
from tests.service.helpers import doc

Stub = genstruct_pb2_grpc.GenstructServiceStub

PARAGRAPHS = [
    "The harbour wall was rebuilt in granite after the storm of the winter before.",
    "Fishing boats moor inside it now; the ferry docks at the new pier to the east.",
    "A lighthouse on the breakwater shows a white flash every five seconds at night.",
    "Tides here rise about four metres, so the inner basin has a gate that holds water.",
]
CONTENT = "\n\n".join(PARAGRAPHS)
CHUNK = genstruct_pb2.TRUNCATION_CHUNK


async def test_every_part_gives_pairs_and_its_span_points_into_the_content(
    stub: Stub, engine: FakeEngine
) -> None:
    response = await stub.Generate(
        doc(CONTENT, id="harbour", truncation=CHUNK, chunk_tokens=100, chunk_overlap_tokens=0,
            num_generations=2),
        timeout=10,
    )
    assert response.chunks == len(PARAGRAPHS)  # each paragraph fits 100 characters; two do not
    assert [(p.chunk_index, p.index) for p in response.pairs] == [
        (c, i) for c in range(len(PARAGRAPHS)) for i in range(2)
    ]
    for pair in response.pairs:
        assert CONTENT[pair.chunk_start : pair.chunk_end] == PARAGRAPHS[pair.chunk_index]
    # the engine saw each part as a document of its own, with the title
    parts = sorted(r.content for r in engine.requests)
    assert parts == sorted(PARAGRAPHS)
    assert {r.title for r in engine.requests} == {"Tides"}
    assert response.usage.completion_tokens == sum(p.completion_tokens for p in response.pairs)
    assert response.usage.prompt_tokens == sum(_prompt_tokens(r) for r in engine.requests)


async def test_overlap_repeats_the_end_of_the_part_before(stub: Stub) -> None:
    text = "One two. Three four. Five six. Seven eight. Nine ten. Eleven twelve."
    response = await stub.Generate(
        doc(text, truncation=CHUNK, chunk_tokens=40, chunk_overlap_tokens=10), timeout=10
    )
    spans = sorted({(p.chunk_start, p.chunk_end) for p in response.pairs})
    assert len(spans) == response.chunks > 1
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))  # overlapping


async def test_content_that_fits_is_one_part(stub: Stub) -> None:
    response = await stub.Generate(doc("A short note.", truncation=CHUNK), timeout=10)
    assert response.chunks == 1
    assert (response.pairs[0].chunk_start, response.pairs[0].chunk_end) == (0, 13)


async def test_generate_batch_answers_once_per_document_with_all_its_parts(stub: Stub) -> None:
    async def requests():  # type: ignore[no-untyped-def]
        yield doc(CONTENT, id="a", truncation=CHUNK, chunk_tokens=100, chunk_overlap_tokens=0)
        yield doc("Short.", id="b", truncation=CHUNK)

    responses = [r async for r in stub.GenerateBatch(requests(), timeout=10)]
    by_id = {r.id: r for r in responses}
    assert len(responses) == 2
    assert by_id["a"].chunks == 4 and len(by_id["a"].pairs) == 4
    assert by_id["b"].chunks == 1


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"chunk_tokens": 10}, "chunk_tokens"),  # below the least part, 16 tokens
        ({"chunk_tokens": 64, "chunk_overlap_tokens": 17}, "chunk_overlap_tokens"),
        ({"chunk_overlap_tokens": 257}, "chunk_overlap_tokens"),  # the default part is 1,024
        ({"chunk_tokens": 2_000_000}, "chunk_tokens"),  # above what one prompt holds
        ({"chunk_tokens": 20}, "document.content"),  # more parts than max_chunks
    ],
)
async def test_bad_chunking_is_refused_naming_the_field(
    stub: Stub, engine: FakeEngine, fields: dict[str, int], field: str
) -> None:
    engine.context_chars = 1_000_000
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Generate(doc(CONTENT * 4, truncation=CHUNK, **fields), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.value.details() or "")
    assert not engine.requests  # refused before any part reached the engine


async def test_an_overlap_as_long_as_the_document_is_refused_at_once(
    stub: Stub, engine: FakeEngine
) -> None:
    # issue 34: each part repeated nearly all of the one before, 37,100 prompt tokens
    content = ("The harbour wall was rebuilt. " * 50)[:1500]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Generate(
            doc(content, truncation=CHUNK, chunk_overlap_tokens=10**9), timeout=10
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith(
        "chunk_overlap_tokens: is 1,000,000,000; it must be at most a quarter of the part, 256"
    )
    assert not engine.requests


async def test_the_overlap_is_cut_to_a_quarter_of_a_part_the_context_made_smaller(
    stub: Stub, engine: FakeEngine
) -> None:
    engine.context_chars = 100  # parts of 100 characters, so an overlap of 25 at most
    content = " ".join(f"Short sentence {i}." for i in range(30))
    response = await stub.Generate(
        doc(content, truncation=CHUNK, chunk_overlap_tokens=200), timeout=10
    )
    spans = sorted({(p.chunk_start, p.chunk_end) for p in response.pairs})
    overlaps = [a[1] - b[0] for a, b in itertools.pairwise(spans) if b[0] < a[1]]
    assert overlaps and max(overlaps) <= 25


async def test_streaming_a_chunked_document_is_refused_with_the_way_out(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in stub.GenerateStream(doc(CONTENT, truncation=CHUNK), timeout=10):
            pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Generate and GenerateBatch" in (error.value.details() or "")


async def test_a_part_that_fails_fails_the_document_and_stops_the_others(
    stub: Stub, engine: FakeEngine
) -> None:
    engine.max_queue = 2  # four parts, two may wait: the others are refused
    engine.n_parallel = 1
    engine.hold()  # the part that takes the slot stops after its first token, mid-generation
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Generate(
            doc(CONTENT, truncation=CHUNK, chunk_tokens=100, chunk_overlap_tokens=0,
                sampling=genstruct_pb2.SamplingParams(max_tokens=8)),
            timeout=10,
        )
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(engine.requests) == 4  # every part was sent
    # The part that was generating was cancelled, not left to finish; those still waiting
    # for the slot left the queue without starting.
    assert engine.started == 1 and len(engine.cancelled) == 1
    await engine.wait_idle()
    assert engine.finished == [] and engine.started == 1
