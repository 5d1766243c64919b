"""What the asyncio side and the engine thread share, under one lock: new jobs, cancellations,
closing, the counts that `stats` and the queue limit read, and the engine's failure."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from genstruct_service.engine.request import Job
from genstruct_service.errors import Draining, ModelError, QueueFull


class Inbox:
    """The engine thread's mailbox and the numbers both threads read."""

    def __init__(self, *, max_queue: int, n_parallel: int) -> None:
        self._max_queue = max_queue
        self._n_parallel = n_parallel
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: list[Job] = []
        self._cancel_epoch = 0  # bumped by every cancellation
        self._seen_cancel_epoch = 0  # the engine thread's
        self.closing = False
        self.broken: BaseException | None = None
        # wait_failed() callers, settled from the engine thread when it dies
        self._failure_waiters: list[asyncio.Future[BaseException]] = []
        self.waiting = 0  # jobs not yet admitted: sent, or queued for slots
        self.busy = 0  # slots held

    # -- the asyncio side

    def check_open(self) -> None:
        """Refuse at once when the engine is closing, has failed, or its queue is full."""
        if self.closing:
            raise Draining("the engine is shutting down")
        if self.broken is not None:
            raise ModelError(f"the engine failed and must be restarted: {self.broken}")
        if self.waiting >= self._max_queue:
            raise QueueFull(
                f"the queue is full ({self._max_queue} requests waiting for "
                f"{self._n_parallel} slots); retry later"
            )

    def submit(self, job: Job) -> None:
        with self._wake:
            self.check_open()
            self.waiting += 1
            self._jobs.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        with self._wake:
            job.cancelled = True
            self._cancel_epoch += 1
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self.closing = True
            self._wake.notify()

    def counts(self) -> tuple[int, int]:
        """(busy slots, jobs waiting)."""
        with self._lock:
            return self.busy, self.waiting

    async def wait_failed(self) -> BaseException:
        future: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self.broken is not None:
                return self.broken
            self._failure_waiters.append(future)
        try:
            return await future
        finally:
            with self._lock, contextlib.suppress(ValueError):  # gone once the thread took it
                self._failure_waiters.remove(future)

    # -- the engine thread

    def take(self, *, busy: bool) -> tuple[list[Job], bool, bool]:
        """Wait for something to do (at once when `busy`); returns the new jobs, whether
        the engine is closing, and whether a caller cancelled since the last take."""
        with self._wake:
            while not (self._jobs or self.closing or busy):
                self._wake.wait()
            jobs, self._jobs = self._jobs, []
            epoch = self._cancel_epoch
            closing = self.closing
        cancelled = epoch != self._seen_cancel_epoch
        self._seen_cancel_epoch = epoch
        return jobs, closing, cancelled

    def publish(self, *, waiting: int, busy: int) -> None:
        """The engine's books after a schedule: `waiting` jobs in its queue (those sent
        since the last take are added) and `busy` slots held."""
        with self._lock:
            self.waiting = waiting + len(self._jobs)
            self.busy = busy

    def slot_freed(self) -> None:
        """A sequence ended and gave its slot back (told before its request's last event)."""
        with self._lock:
            self.busy -= 1

    def fail(self, error: BaseException) -> list[Job]:
        """The engine thread died of `error`: refuse from now on; returns the jobs sent."""
        with self._lock:
            self.broken = error
            jobs, self._jobs = self._jobs, []
        return jobs

    def settle_waiters(self, error: BaseException) -> None:
        """Tell wait_failed() callers (after the calls in flight were told, so a draining
        server sees them end)."""
        with self._lock:
            waiters, self._failure_waiters = self._failure_waiters, []
        for future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                future.get_loop().call_soon_threadsafe(_settle, future, error)


def _settle(future: asyncio.Future[BaseException], error: BaseException) -> None:
    if not future.done():  # the waiter may have been cancelled meanwhile
        future.set_result(error)
