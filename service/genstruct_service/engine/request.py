"""A request in the engine: the asyncio side's `Job`, and the engine thread's `Request` with
an explicit status (waiting, prefilling, generating, done) and one `Sequence` per generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Sequence as Events

from genstruct_service.engine.admission import Ticket
from genstruct_service.engine.fitting import FittedPrompt
from genstruct_service.engine.ngrams import PromptNgrams
from genstruct_service.engine.sequence import Sequence
from genstruct_service.engine.types import EngineEvent, GenerationRequest


class Job:
    """One request as both threads see it; `queue` is read only by the asyncio side."""

    __slots__ = ("answered", "cancelled", "loop", "ngrams", "prompt", "queue", "request",
                 "submitted")  # fmt: skip

    def __init__(
        self,
        request: GenerationRequest,
        prompt: FittedPrompt,
        ngrams: PromptNgrams | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.request = request
        self.prompt = prompt  # the prompt's token ids, fitted before the engine thread
        self.ngrams = ngrams  # its n-gram index for drafts, None without speculation
        self.loop = loop
        self.queue: asyncio.Queue[Events[EngineEvent] | BaseException] = asyncio.Queue()
        self.submitted = time.perf_counter()
        self.cancelled = False  # set by the asyncio side, read by the engine thread
        self.answered = False  # set by the asyncio side once the last event arrived


_Delivery = tuple[Job, Events[EngineEvent] | BaseException]


class Outbox:
    """Events for callers, collected through a step and delivered at its end with one wake-up
    per event loop: each `call_soon_threadsafe` writes to the loop's self-pipe, and a step
    streams text to every request in it."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[_Delivery] = []  # what the next flush delivers

    def put(self, job: Job, item: Events[EngineEvent] | BaseException) -> None:
        self.items.append((job, item))

    def flush(self) -> None:
        if not self.items:
            return
        items, self.items = self.items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        for job, item in items:
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody listens
                loop.call_soon_threadsafe(deliver, batch)


def deliver(batch: list[_Delivery]) -> None:
    """On the callers' event loop: each event into its request's queue."""
    for job, item in batch:
        job.queue.put_nowait(item)


class Status(enum.Enum):
    """Where a request is, as llama-server's slot_state says it."""

    WAITING = "waiting"  # queued for its slots and KV cells
    PREFILLING = "prefilling"  # holds its slots; its prompt is being decoded
    GENERATING = "generating"  # its sequences sample tokens
    DONE = "done"  # every sequence ended and its last event is sent (or it failed)


class Request:
    """One request on the engine thread, from the queue to its last event."""

    __slots__ = (
        "accepted_draft_tokens",
        "admitted",
        "computed",
        "draft_tokens",
        "first_token",
        "job",
        "repeatable",
        "seeded_sampled",
        "seqs",
        "status",
        "stream",
        "ticket",
        "tokens",
    )  # fmt: skip

    def __init__(self, job: Job, seqs: list[Sequence]) -> None:
        sampling = job.request.sampling
        self.job = job
        self.seqs = seqs
        self.tokens = job.prompt.tokens
        self.status = Status.WAITING
        self.stream = job.request.stream  # its text is sent as it comes
        # its slots and KV reservation in the admission books
        self.ticket: Ticket[Request] = Ticket(
            self, generations=len(seqs), prompt_cells=len(self.tokens),
            cells_per_generation=sampling.max_tokens,
        )
        self.computed = 0  # prompt tokens in the KV cache
        self.admitted = 0.0
        self.first_token = 0.0
        # greedy or seeded: run alone, its text is the same every time
        self.repeatable = sampling.temperature <= 0 or sampling.seed is not None
        # under auto, drafted only when alone (engine/drafts.py)
        self.seeded_sampled = sampling.temperature > 0 and sampling.seed is not None
        self.draft_tokens = 0  # drafted tokens verified, over all its generations
        self.accepted_draft_tokens = 0  # of which the sampler agreed with

    @property
    def greedy(self) -> bool:
        """Temperature 0: every generation writes the same text."""
        return self.repeatable and not self.seeded_sampled

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet in the KV cache."""
        return len(self.tokens) - self.computed

    @property
    def finished(self) -> bool:
        """Every sequence has ended."""
        return all(seq.finish_reason is not None for seq in self.seqs)
