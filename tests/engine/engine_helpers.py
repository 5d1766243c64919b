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


class GreedyReference:
    """The argmax chain of a model decoded one token per step (llama-cpp-python's Llama),
    with the margin of each choice: the top logit minus the runner-up.

    A batch of several rows (a verified draft) can compute logits a hair apart from one row
    alone, so greedy text with drafts may leave the chain where its top two logits all but
    tie; `departure` finds where a text leaves the chain and with what margin.
    """

    def __init__(self, model_path: str, *, n_ctx: int, n_batch: int, flash_attn: bool) -> None:
        import llama_cpp

        self._llm = llama_cpp.Llama(
            model_path, n_ctx=n_ctx, n_batch=n_batch, n_threads=2, n_threads_batch=2,
            flash_attn=flash_attn, verbose=False,
        )  # fmt: skip

    def chain(self, prompt: list[int], steps: int) -> list[tuple[int, float]]:
        """(token, margin) of `steps` greedy steps after `prompt`."""
        import numpy as np

        llm = self._llm
        llm.reset()
        llm.eval(prompt)
        out: list[tuple[int, float]] = []
        for _ in range(steps):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            top, second = np.partition(logits, -2)[-1:-3:-1]
            token = int(np.argmax(logits))
            out.append((token, float(top - second)))
            llm.eval([token])
        return out

    def departure(self, prompt: list[int], text: str, steps: int) -> float | None:
        """The margin of the chain's step where `text` leaves it; None if it never does."""
        want = text.encode()
        have = b""
        for token, margin in self.chain(prompt, steps):
            if len(have) >= len(want):
                return None
            have += self._llm.detokenize([token])
            if not want.startswith(have[: len(want)]):
                return margin
        return None
