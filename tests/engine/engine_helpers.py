"""Helpers of the engine tests: wait on the engine's steps, collect a request's events."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from genstruct_service.engine import Completed, EngineEvent, GenerationRequest, TokenDelta

# The two small models every engine test runs on (see conftest.py).
GEMMA = "gemma-3-270m:Q4_K_M"
GENSTRUCT_SHAPED = "genstruct-7b-shaped-tiny"


class StepRecorder:
    """The engine's `on_step` hook: counts decodes and lets a test wait for a condition."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.steps = 0
        self.tokens = 0

    def __call__(self, batch_tokens: int) -> None:
        with self._cond:
            self.steps += 1
            self.tokens += batch_tokens
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll a condition of the engine that no event announces (bounded in time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("the condition did not hold in time")
        await asyncio.sleep(0.002)


async def collect(
    engine: object, request: GenerationRequest
) -> tuple[list[TokenDelta], Completed]:
    """Every delta and the one Completed, checking that Completed comes last and once."""
    deltas: list[TokenDelta] = []
    completed: list[Completed] = []
    event: EngineEvent
    async for event in engine.generate(request):  # type: ignore[attr-defined]
        assert not completed, "an event came after Completed"
        if isinstance(event, Completed):
            completed.append(event)
        else:
            deltas.append(event)
    assert len(completed) == 1
    return deltas, completed[0]


def joined(deltas: list[TokenDelta], index: int) -> str:
    return "".join(d.text for d in deltas if d.index == index)
