"""One connection may hold only its share of the documents the server holds, so one bulk job
cannot refuse every other caller."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2_grpc
from genstruct_service.config import Settings
from genstruct_service.server import RunningServer

from tests.fakes import FakeEngine
from tests.service.helpers import doc, make_settings

Stub = genstruct_pb2_grpc.GenstructServiceStub
# a channel of its own: grpc would otherwise share one connection between the two channels
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture
def settings() -> Settings:
    # the server holds 4 documents (max_queue 3 + n_parallel 1); one connection half of them
    return make_settings(max_queue=3, n_parallel=1, max_num_generations=1,
                         queue_share_per_connection=0.5)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(hold=True, n_parallel=8, max_queue=256)


async def test_a_bulk_stream_takes_its_share_and_others_still_get_in(
    server: RunningServer, engine: FakeEngine
) -> None:
    async with grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as bulk, \
            grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as other:
        async def documents():  # type: ignore[no-untyped-def]
            for i in range(4):
                yield doc(id=f"bulk{i}")

        stream = Stub(bulk).GenerateBatch(documents(), timeout=20)
        responses = stream.__aiter__()
        refused = [await anext(responses), await anext(responses)]  # answered at once
        assert sorted((r.id, r.error.code) for r in refused) == [
            ("bulk2", grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]),
            ("bulk3", grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]),
        ]
        assert "its share of the server" in refused[0].error.message
        await engine.wait_started(2)
        # another caller still gets in, though the bulk job asked for all the room there is
        call = asyncio.ensure_future(Stub(other).Generate(doc(id="other"), timeout=20))
        await engine.wait_started(3)
        engine.release()
        assert (await call).id == "other"
        assert sorted([r.id async for r in responses]) == ["bulk0", "bulk1"]
