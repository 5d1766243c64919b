"""The pool that splits documents: its own threads, and a bounded queue in front of them."""

from __future__ import annotations

import asyncio
import threading

import pytest
from genstruct_service.errors import QueueFull
from genstruct_service.preparation import PreparePool


async def test_calls_beyond_the_threads_and_the_queue_are_refused() -> None:
    pool = PreparePool(threads=1, max_waiting=1)
    release = threading.Event()
    started = threading.Event()

    def work() -> str:
        started.set()
        assert release.wait(10)
        return threading.current_thread().name

    try:
        running = asyncio.ensure_future(pool.run(work))
        waiting = asyncio.ensure_future(pool.run(lambda: "second"))
        assert await asyncio.to_thread(started.wait, 10)
        assert pool.pending == 2
        with pytest.raises(QueueFull):
            await pool.run(lambda: "third")
        release.set()
        assert (await running).startswith("genstruct-prepare")
        assert await waiting == "second"
        assert pool.pending == 0
    finally:
        release.set()
        pool.close()
