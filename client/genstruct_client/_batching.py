"""Bookkeeping of `generate_many`: what is waiting, in flight or due for another attempt."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import grpc
import grpc.aio
from genstruct.v1 import genstruct_pb2 as pb
from google.rpc import status_pb2

from genstruct_client.errors import ErrorDetails

# Stream-wide failures after which the documents without a result are sent again: the server
# went away (killed, restarted, draining, connection lost) or pushed back.
STREAM_RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
# The trailer in which the Genstruct server sends a call's request id: with every status it
# sends, its own INTERNAL errors included.
REQUEST_ID_KEY = "x-request-id"


def stream_failure_is_transient(error: grpc.aio.AioRpcError) -> bool:
    """Whether a GenerateBatch stream that failed with `error` is worth reopening."""
    code = error.code()
    if code == grpc.StatusCode.INTERNAL:
        return not sent_by_server(error)
    return code in STREAM_RETRY_CODES or code == grpc.StatusCode.DEADLINE_EXCEEDED


def sent_by_server(error: grpc.aio.AioRpcError) -> bool:
    """Whether the status of `error` came from the Genstruct server, not from gRPC's client.

    grpc's asyncio client reports a write that fails because the server had just ended the
    stream (a draining or stopping server; grpc/grpc#36066) as an INTERNAL error of its own,
    in place of the server's status. A status made up on this side has no trailers, so no
    request id; that tells the two apart whatever words a grpc release uses for it.
    tests/client/test_grpc_pins.py pins how the installed grpc reports the race.
    """
    # grpc-stubs types them as the sync API's trailers
    trailers = cast("grpc.aio.Metadata", error.trailing_metadata())
    return REQUEST_ID_KEY in trailers


# Per-document refusals inside GenerateBatch worth another attempt.
ITEM_RETRY_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
)


@dataclass(frozen=True, slots=True)
class ResubmitPolicy:
    """How `generate_many` retries what gRPC's own retry cannot (streams already answering).

    Each document gets up to `max_attempts` tries; a try is used up when the document is
    refused with UNAVAILABLE / RESOURCE_EXHAUSTED, cancelled by a draining server, runs past
    its own deadline (the server answers it DEADLINE_EXCEEDED; the stream goes on), or is in
    flight on a stream that the server was answering when it broke. Streams are reopened with
    exponential backoff and full jitter; the run gives up (BatchAborted) when no result at all
    has come back for `budget_seconds`. A refusal with the server's RetryInfo waits at least
    its delay (up to `max_backoff`) before the next try.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.5  # seconds
    max_backoff: float = 15.0  # seconds
    multiplier: float = 2.0
    budget_seconds: float = 300.0

    def backoff(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after `failures` failures in a row (full jitter)."""
        growth = self.multiplier ** max(0, failures - 1)
        ceiling = min(self.max_backoff, self.initial_backoff * growth)
        return ceiling * rng()


class BatchAborted(Exception):
    """The servers stayed unreachable (or failed the stream for good): the rest was not done.

    `error_details` are the server's details of the last failure (reason, field, retry delay).
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, error_details: ErrorDetails | None = None
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.error_details = error_details or ErrorDetails()

    @property
    def reason(self) -> str | None:
        return self.error_details.reason


@dataclass(slots=True)
class Item:
    """One document on its way through generate_many."""

    request: pb.GenerateRequest
    attempts: int = 0  # tries used up


def error_response(
    item: Item, code: int, message: str, details: ErrorDetails | None = None
) -> pb.GenerateResponse:
    """A result that says the document failed, with the server's details of why, if any."""
    status = status_pb2.Status(code=code, message=message)
    if details is not None:
        status.details.extend(details.packed)
    return pb.GenerateResponse(id=item.request.id, error=status)


@dataclass(slots=True)
class Scheduler:
    """Hands out documents: retries that are due first, then new ones from the source."""

    source: Iterator[pb.GenerateRequest]
    clock: Callable[[], float] = time.monotonic
    in_flight: int = 0
    exhausted: bool = False
    last_progress: float = 0.0
    _ready: deque[Item] = field(default_factory=deque)
    _delayed: list[tuple[float, int, Item]] = field(default_factory=list)
    _seq: Iterator[int] = field(default_factory=itertools.count)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.last_progress = self.clock()

    @property
    def finished(self) -> bool:
        return self.exhausted and not self._ready and not self._delayed and self.in_flight == 0

    def poll(self) -> Item | float | None:
        """An item to send; None when everything is finished; else seconds to wait at most
        (math.inf when only a result from a stream can change anything)."""
        now = self.clock()
        while self._delayed and self._delayed[0][0] <= now:
            self._ready.append(heapq.heappop(self._delayed)[2])
        if self._ready:
            self.in_flight += 1
            return self._ready.popleft()
        if not self.exhausted:
            try:
                request = next(self.source)
            except StopIteration:
                self.exhausted = True
            else:
                self.in_flight += 1
                return Item(request)
        if self.finished:
            return None
        return self._delayed[0][0] - now if self._delayed else float("inf")

    async def take(self) -> Item | None:
        """The next item to send, waiting for one; None when everything is finished."""
        while True:
            polled = self.poll()
            if polled is None or isinstance(polled, Item):
                return polled
            changed = self._changed
            timeout = None if polled == float("inf") else max(0.0, polled)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def done(self, item: Item) -> None:
        """The item has its final result."""
        self.in_flight -= 1
        self.last_progress = self.clock()
        self._notify()

    def progress(self) -> None:
        self.last_progress = self.clock()

    def retry(self, item: Item, delay: float) -> None:
        """Send the item again after `delay` seconds."""
        self.in_flight -= 1
        heapq.heappush(self._delayed, (self.clock() + delay, next(self._seq), item))
        self._notify()

    def stalled_for(self) -> float:
        """Seconds since the last result."""
        return self.clock() - self.last_progress
