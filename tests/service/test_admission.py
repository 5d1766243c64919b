"""Admission: a document counts from the moment it arrives, before it is tokenized, so the
server holds at most max_queue + n_parallel documents whatever step they are at."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2_grpc
from genstruct_service.config import Settings

from tests.fakes import FakeEngine
from tests.service.helpers import doc, make_settings

Stub = genstruct_pb2_grpc.GenstructServiceStub


@pytest.fixture
def settings() -> Settings:
    # every document may come from one connection here: its share is the whole
    return make_settings(max_queue=1, n_parallel=1, max_num_generations=1,
                         queue_share_per_connection=1.0)


@pytest.fixture
def engine() -> FakeEngine:
    # the engine's own queue would take many more: what refuses here is the server's count
    return FakeEngine(hold=True, n_parallel=8, max_queue=256)


async def test_documents_beyond_the_queue_and_the_slots_are_refused_before_the_engine(
    stub: Stub, engine: FakeEngine
) -> None:
    held = [asyncio.ensure_future(stub.Generate(doc(id=f"d{i}"), timeout=20)) for i in range(2)]
    await engine.wait_started(2)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Generate(doc(id="third"), timeout=5)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "holds 2 documents already" in (error.value.details() or "")

    async def batch():  # type: ignore[no-untyped-def]
        yield doc(id="in-a-batch")

    responses = [r async for r in stub.GenerateBatch(batch(), timeout=5)]
    assert [(r.id, r.error.code) for r in responses] == [
        ("in-a-batch", grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    ]
    assert len(engine.requests) == 2  # neither reached the engine
    engine.release()
    await asyncio.gather(*held)
    # the count is given back: the next document is served
    assert (await stub.Generate(doc(id="after"), timeout=10)).id == "after"
