"""The generation engine: its vocabulary (types) and the llama.cpp implementation.

`LlamaEngine` is imported lazily so that the types can be used without llama-cpp-python
installed (the servicer's tests use a fake engine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from genstruct_service.engine.types import (
    Completed,
    Engine,
    EngineEvent,
    EngineInfo,
    EngineStats,
    FinishReason,
    Generation,
    GenerationRequest,
    Sampling,
    Timings,
    TokenDelta,
    Truncation,
)

if TYPE_CHECKING:
    from genstruct_service.engine.llama import LlamaEngine

__all__ = [
    "Completed",
    "Engine",
    "EngineEvent",
    "EngineInfo",
    "EngineStats",
    "FinishReason",
    "Generation",
    "GenerationRequest",
    "LlamaEngine",
    "Sampling",
    "Timings",
    "TokenDelta",
    "Truncation",
]


def __getattr__(name: str) -> Any:
    if name == "LlamaEngine":
        from genstruct_service.engine.llama import LlamaEngine

        return LlamaEngine
    raise AttributeError(name)
