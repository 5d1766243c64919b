"""Evidence and grounding in responses, and the server's default for constrained output,
through a real gRPC server with the fake engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc.aio
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_service.server import start_server

from tests.fakes import FakeEngine
from tests.service.helpers import doc, make_settings

Stub = genstruct_pb2_grpc.GenstructServiceStub

CONTENT = "Tides are the rise and fall of sea levels caused by the Moon and the Sun."
# The question copies nothing; the answer copies the content's first 14 words, then adds two.
TOKENS = (
    "Why do seas move?",
    " [[[Assistant]]]",
    " Tides are the rise and fall of sea levels",
    " caused by the Moon and cheese.",
)
COPIED = "Tides are the rise and fall of sea levels caused by the Moon and"


@asynccontextmanager
async def serving(
    engine: FakeEngine, *, stand_in: bool = False, **settings: Any
) -> AsyncIterator[Stub]:
    running = await start_server(make_settings(**settings), None, metrics_port=0)
    await running.set_engine(engine, stand_in=stand_in)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            yield genstruct_pb2_grpc.GenstructServiceStub(channel)
    finally:
        await running.stop(None)


def check_pair(pair: genstruct_pb2.Pair, content: str) -> None:
    assert pair.parsed
    assert [content[s.start : s.end] for s in pair.evidence] == [COPIED]
    assert abs(pair.grounding - 14 / 16) < 1e-6
    assert pair.question_grounding == 0.0


async def test_every_rpc_says_what_the_answer_copies() -> None:
    async with serving(FakeEngine(tokens=TOKENS)) as stub:
        response = await stub.Generate(doc(CONTENT, num_generations=2), timeout=5)
        for pair in response.pairs:
            check_pair(pair, CONTENT)
        messages = [m async for m in stub.GenerateStream(doc(CONTENT), timeout=5)]
        check_pair(messages[-1].result.pairs[0], CONTENT)
        batch = [r async for r in stub.GenerateBatch(iter([doc(CONTENT, id="a")]), timeout=5)]
        check_pair(batch[0].pairs[0], CONTENT)


async def test_a_question_that_copies_the_document_is_grounded_too() -> None:
    tokens = ("Tides are the rise and fall of sea levels?", " [[[Assistant]]]", " Yes.")
    async with serving(FakeEngine(tokens=tokens)) as stub:
        pair = (await stub.Generate(doc(CONTENT), timeout=5)).pairs[0]
    # 9 of its 10 words (the question mark is its own)
    assert abs(pair.question_grounding - 9 / 10) < 1e-6
    assert pair.grounding == 0.0 and not pair.evidence


async def test_chunked_spans_point_into_the_whole_content() -> None:
    filler = "Harbour walls were rebuilt in granite after a storm long ago."
    content = f"{filler}\n\n{CONTENT}"
    async with serving(FakeEngine(tokens=TOKENS)) as stub:
        response = await stub.Generate(
            doc(content, truncation=genstruct_pb2.TRUNCATION_CHUNK, chunk_tokens=80,
                chunk_overlap_tokens=0),
            timeout=5,
        )
    assert response.chunks == 2
    first, second = response.pairs
    assert not first.evidence and first.grounding == 0.0  # the filler holds none of it
    assert second.chunk_start > 0
    check_pair(second, content)


async def test_a_pair_that_did_not_parse_has_no_grounding() -> None:
    tokens = (COPIED, " and more")  # no [[[Assistant]]] marker
    async with serving(FakeEngine(tokens=tokens)) as stub:
        pair = (await stub.Generate(doc(CONTENT, constrained=False), timeout=5)).pairs[0]
    assert not pair.parsed and not pair.evidence and pair.grounding == 0.0


async def test_the_run_length_is_a_setting_and_0_turns_grounding_off() -> None:
    async with serving(FakeEngine(tokens=TOKENS), grounding_min_run_tokens=15) as stub:
        info = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=5)
        pair = (await stub.Generate(doc(CONTENT), timeout=5)).pairs[0]
    assert info.grounding_min_run_tokens == 15
    assert pair.grounding == 0.0 and not pair.evidence  # the copied run is 14 words
    async with serving(FakeEngine(tokens=TOKENS), grounding_min_run_tokens=0) as stub:
        info = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=5)
        pair = (await stub.Generate(doc(CONTENT), timeout=5)).pairs[0]
    assert info.grounding_min_run_tokens == 0
    assert pair.grounding == 0.0 and not pair.evidence
    async with serving(FakeEngine(tokens=TOKENS)) as stub:
        info = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=5)
    assert info.grounding_min_run_tokens == 6  # the default


async def test_constrained_defaults_on_for_the_stand_in_and_a_request_overrides_it() -> None:
    engine = FakeEngine()
    async with serving(engine, stand_in=True) as stub:
        info = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=5)
        await stub.Generate(doc(), timeout=5)
        await stub.Generate(doc(constrained=False), timeout=5)
    assert info.default_constrained
    assert [r.constrained for r in engine.requests] == [True, False]

    engine = FakeEngine()
    async with serving(engine, stand_in=False) as stub:
        info = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=5)
        await stub.Generate(doc(), timeout=5)
        await stub.Generate(doc(constrained=True), timeout=5)
    assert not info.default_constrained
    assert [r.constrained for r in engine.requests] == [False, True]

    engine = FakeEngine()  # the server's setting wins over what the model is
    async with serving(engine, stand_in=True, constrained=False) as stub:
        info = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=5)
        await stub.Generate(doc(), timeout=5)
    assert not info.default_constrained and not engine.requests[0].constrained
