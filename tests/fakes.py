"""A fake Engine for tests of the gRPC layer: fixed tokens, controllable pace, observable slots.

    engine = FakeEngine()                      # instant, every completion parses
    engine = FakeEngine(token_delay=0.01)      # paced tokens
    engine = FakeEngine(hold=True)             # each generation stops after its first token
    engine.release()                           # ... until released
    engine.fail_next(QueueFull("queue full"))  # the next request is refused before any event
    engine.refuse(QueueFull("queue full"))     # every request is, until refuse(None)
    engine.fail_engine(RuntimeError("boom"))   # dead for good, like a crashed engine thread
    await engine.wait_started(1)               # a request holds a slot
    engine.cancelled, engine.stats().busy_slots

`make_engine(settings)` builds one for `genstruct-server` run as a subprocess; pick it with
GENSTRUCT_ENGINE_FACTORY=tests.fakes:make_engine (and FAKE_ENGINE_TOKEN_DELAY=<seconds>;
FAKE_ENGINE_FAIL_AFTER=<n>: the engine fails for good once n requests have completed).
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from genstruct_service.engine.admission import Admission, Ticket
from genstruct_service.engine.types import (
    Completed,
    EngineEvent,
    EngineInfo,
    EngineStats,
    FinishReason,
    Generation,
    GenerationRequest,
    Timings,
    TokenDelta,
    Truncation,
)
from genstruct_service.errors import (
    ContextOverflow,
    InvalidRequest,
    ModelError,
    QueueFull,
    Unavailable,
)

# A completion that parses: "What is the document about?" / "It is about testing."
DEFAULT_TOKENS: tuple[str, ...] = (
    "What",
    " is",
    " the",
    " document",
    " about",
    "?",
    " [[[Assistant]]]",
    " It",
    " is",
    " about",
    " testing",
    ".",
)

FAKE_INFO = EngineInfo(
    model_name="fake-model:Q4_K_M",
    model_path="/models/fake-model.Q4_K_M.gguf",
    quantization="Q4_K_M",
    parameter_count=7_241_732_096,
    architecture="llama",
    context_length=8192,
    train_context_length=32768,
    n_parallel=4,
    gpu_layers_offloaded=0,
    total_layers=32,
    backend="CPU",
)


class FakeEngine:
    """Implements the Engine Protocol with fixed tokens; every knob is a plain attribute."""

    def __init__(
        self,
        *,
        tokens: Sequence[str] = DEFAULT_TOKENS,
        n_parallel: int = 4,
        max_queue: int = 256,
        token_delay: float = 0.0,
        hold: bool = False,
        context_chars: int = 1_000_000,
        info: EngineInfo | None = None,
        on_step: Callable[[int], None] | None = None,
        fail_after: int | None = None,
        tokens_for: Callable[[GenerationRequest], Sequence[str]] | None = None,
    ) -> None:
        self.tokens = tuple(tokens)
        # the tokens of a request's completion, when they depend on it (else `tokens`)
        self.tokens_for = tokens_for
        self.fail_after = fail_after  # fail_engine() once this many requests have completed
        self.n_parallel = n_parallel
        self.max_queue = max_queue
        self.token_delay = token_delay
        # The content that fits the "context"; longer content is refused or truncated.
        self.context_chars = context_chars
        self.on_step = on_step
        self._info = info or FAKE_INFO
        self._hold = hold
        self._released: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        # admission as the real engine's: one slot per generation, the same scheduler
        self._scheduler: Admission[asyncio.Future[None]] | None = None
        self._fail: list[BaseException] = []
        self._refusal: BaseException | None = None
        self._failure: BaseException | None = None
        self._failed: asyncio.Event | None = None
        self.busy = 0
        self.queued = 0
        self.requests: list[GenerationRequest] = []  # every request submitted
        self.started = 0  # requests that took a slot
        self.deltas = 0  # TokenDeltas yielded, all requests together
        self.finished: list[GenerationRequest] = []  # requests that completed
        self.cancelled: list[GenerationRequest] = []  # requests closed or cancelled midway
        self.closed = False

    # --- controls for tests ---------------------------------------------------------------

    def hold(self) -> None:
        """From now on, generations pause after their first token until `release()`."""
        self._hold = True
        if self._released is not None:
            self._released.clear()

    def release(self) -> None:
        """Let held generations (and later ones) run to the end."""
        self._hold = False
        self._event("_released").set()

    def fail_next(self, error: BaseException) -> None:
        """The next request raises `error` before its first event (e.g. QueueFull)."""
        self._fail.append(error)

    def refuse(self, error: BaseException | None) -> None:
        """Every request raises a copy of `error` before its first event; None ends that."""
        self._refusal = error

    def fail_engine(self, error: BaseException) -> None:
        """Fail for good, as LlamaEngine does when its thread dies: requests in flight raise
        ModelError at their next step (held ones at once), later ones at once."""
        if self._failure is not None:
            return
        self._failure = error
        self._event("_failed").set()
        self._event("_released").set()  # held generations wake up, to fail
        self._notify()

    async def wait_for(self, predicate: Callable[[FakeEngine], bool], timeout: float = 5) -> None:
        """Wait until `predicate(self)` holds (checked on every state change), bounded."""

        async def wait() -> None:
            while not predicate(self):
                changed = self._event("_changed")
                changed.clear()
                await changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def wait_started(self, count: int = 1, timeout: float = 5) -> None:
        await self.wait_for(lambda e: e.started >= count, timeout)

    async def wait_idle(self, timeout: float = 5) -> None:
        """Wait until no slot is busy and nothing is queued."""
        await self.wait_for(lambda e: e.busy == 0 and e.queued == 0, timeout)

    # --- the Engine Protocol --------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    def stats(self) -> EngineStats:
        return EngineStats(busy_slots=self.busy, queued=self.queued, n_parallel=self.n_parallel)

    def count_tokens(self, text: str) -> int:
        return len(text)  # one token per character, as `context_chars` counts them

    def content_budget(self, request: GenerationRequest) -> int:
        return self.context_chars

    def _admit(self) -> None:
        assert self._scheduler is not None
        for ticket in self._scheduler.admit():
            if ticket.item.done():  # its caller went away while it waited
                self._scheduler.release_all(ticket)
            else:
                ticket.item.set_result(None)

    def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        return self._generate(request)

    async def close(self) -> None:
        self.closed = True

    async def wait_failed(self) -> BaseException:
        await self._event("_failed").wait()
        assert self._failure is not None
        return self._failure

    # --- internals ------------------------------------------------------------------------

    def _event(self, name: str) -> asyncio.Event:
        event: asyncio.Event | None = getattr(self, name)
        if event is None:
            event = asyncio.Event()
            if name == "_released" and not self._hold:
                event.set()
            setattr(self, name, event)
        return event

    def _notify(self) -> None:
        self._event("_changed").set()

    def _check_alive(self, error: type[Unavailable | ModelError]) -> None:
        if self._failure is not None:
            raise error(f"the engine failed and must be restarted: {self._failure}")

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        submitted = time.perf_counter()
        self.requests.append(request)
        self._check_alive(ModelError)
        if self._fail:
            raise self._fail.pop(0)
        if self._refusal is not None:
            raise copy.copy(self._refusal)
        truncated = False
        if len(request.content) > self.context_chars:
            if request.truncation is Truncation.REFUSE:
                raise ContextOverflow(
                    "document.content",
                    f"needs more than the {self.context_chars} characters of context; "
                    "shorten it or ask for truncation",
                )
            truncated = True
        if self._scheduler is None:
            self._scheduler = Admission(self.n_parallel, _FAKE_CONTEXT)
        scheduler = self._scheduler
        n = request.num_generations
        if n > scheduler.n_slots:
            raise InvalidRequest(
                "num_generations", f"must be between 1 and {scheduler.n_slots} (the engine's "
                f"slots), got {n}")
        ticket = Ticket(asyncio.get_running_loop().create_future(), generations=n,
                        prompt_cells=_prompt_tokens(request),
                        cells_per_generation=request.sampling.max_tokens)
        if self.queued >= self.max_queue and (scheduler.waiting or not _fits_now(scheduler, n)):
            raise QueueFull(f"the queue is full ({self.max_queue} documents waiting)")
        scheduler.enqueue(ticket)
        self.queued += 1
        self._notify()
        self._admit()
        try:
            await ticket.item
        except BaseException:
            if not scheduler.drop(lambda t: t is ticket):  # admitted as it was cancelled
                scheduler.release_all(ticket)
                self._admit()
            raise
        finally:
            self.queued -= 1
        self.busy += n
        self.started += 1
        self._notify()
        done = False
        try:
            self._check_alive(ModelError)  # it failed while this one waited for a slot
            queue_s = time.perf_counter() - submitted
            first_token_s = 0.0
            max_tokens = request.sampling.max_tokens
            n = request.num_generations
            texts = [""] * n
            counts = [0] * n
            tokens = self.tokens if self.tokens_for is None else tuple(self.tokens_for(request))
            for position, token in enumerate(tokens[:max_tokens]):
                if position == 1 and self._hold:
                    await self._event("_released").wait()
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)  # a step boundary, where cancellation lands
                self._check_alive(ModelError)
                if self.on_step is not None:
                    self.on_step(n)
                for index in range(n):
                    texts[index] += token
                    counts[index] += 1
                    self.deltas += 1
                    self._notify()
                    if request.stream:  # as the real engine: text only to a streaming caller
                        yield TokenDelta(index=index, text=token)
                if position == 0:
                    first_token_s = time.perf_counter() - submitted
            reason = FinishReason.LENGTH if len(tokens) > max_tokens else FinishReason.EOS
            generations = tuple(
                Generation(
                    index=i, text=texts[i], finish_reason=reason, completion_tokens=counts[i]
                )
                for i in range(n)
            )
            done = True
            self.finished.append(request)
            yield Completed(
                generations=generations,
                prompt_tokens=_prompt_tokens(request),
                truncated=truncated,
                timings=Timings(
                    queue_seconds=queue_s,
                    first_token_seconds=first_token_s,
                    total_seconds=time.perf_counter() - submitted,
                ),
            )
        finally:
            if not done:
                self.cancelled.append(request)
            self.busy -= n
            scheduler.release_all(ticket)
            self._admit()
            self._notify()
            if done and self.fail_after is not None and len(self.finished) >= self.fail_after:
                self.fail_engine(RuntimeError(f"injected fault after {self.fail_after} requests"))


# KV cells of the fake: as many as any test needs (context_chars bounds the content instead)
_FAKE_CONTEXT = 1 << 40


def _fits_now(scheduler: Admission[Any], generations: int) -> bool:
    return scheduler.n_slots - scheduler.busy_slots >= generations


def _prompt_tokens(request: GenerationRequest) -> int:
    return 32 + len(request.title.split()) + len(request.content.split())


def echo_tokens(request: GenerationRequest) -> tuple[str, ...]:
    """A completion made of the document: its title as the question and its content as the
    answer (grounding 1 for content of six words or more); no `[[[Assistant]]]` marker, so
    no parse, when the content holds `[noparse]`."""
    marker = () if "[noparse]" in request.content else (" [[[Assistant]]]",)
    return (f"{request.title}?", *marker, f" {request.content.strip()}")


def make_engine(settings: Any, *, on_step: Callable[[int], None] | None = None) -> FakeEngine:
    """The engine factory for `genstruct-server` in subprocess tests (see the module doc)."""
    return FakeEngine(
        n_parallel=settings.n_parallel,
        max_queue=settings.max_queue,
        token_delay=float(os.environ.get("FAKE_ENGINE_TOKEN_DELAY", "0")),
        on_step=on_step,
        fail_after=int(os.environ["FAKE_ENGINE_FAIL_AFTER"])
        if os.environ.get("FAKE_ENGINE_FAIL_AFTER")
        else None,
    )
