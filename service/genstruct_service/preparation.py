"""Threads for the work on a document before the engine takes it (splitting it into parts).

Its own small pool, not asyncio's default one: a burst of long documents then waits here, in
a queue with a bound, rather than holding the threads that every request's tokenization uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .errors import QueueFull

T = TypeVar("T")


class PreparePool:
    """`threads` workers; at most `max_waiting` more calls wait, later ones are refused."""

    def __init__(self, threads: int, max_waiting: int) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="genstruct-prepare")
        self._limit = threads + max_waiting
        self._in = 0  # calls running or waiting for a thread

    @property
    def pending(self) -> int:
        """Calls running or waiting for a thread now."""
        return self._in

    async def run(self, fn: Callable[[], T]) -> T:
        """fn() on a worker thread; QueueFull when the pool's queue is full.

        Cancelling the caller drops a call that has not started; one that has runs to its
        end on its thread (a split is linear in the document, so that end is near).
        """
        if self._in >= self._limit:
            raise QueueFull(
                f"the server is preparing {self._in} documents already; retry with backoff",
                figures={"held": self._in, "limit": self._limit, "scope": "preparation"},
            )
        self._in += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            self._in -= 1

    def close(self) -> None:
        """Drop the calls that wait; the running ones finish on their threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)
