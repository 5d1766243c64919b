"""Fixtures of the client tests: fake-engine servers in process and in subprocesses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from genstruct_service.config import Settings
from genstruct_service.server import RunningServer, start_server

from tests.client.helpers import ServerProcess
from tests.fakes import FakeEngine


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def settings() -> Settings:
    return Settings(
        host="127.0.0.1", port=0, metrics_port=0, max_batch_in_flight=8,
        max_content_chars=1000, log_format="text", log_level="ERROR",
    )


@pytest.fixture
async def server(settings: Settings, engine: FakeEngine) -> AsyncIterator[RunningServer]:
    """A server in this test's event loop: use the asyncio client against it."""
    running = await start_server(settings, engine)
    yield running
    engine.release()
    await running.stop(None)


@pytest.fixture(scope="module")
def server_process() -> Iterator[ServerProcess]:
    """A server in a subprocess (for the sync client and the command line)."""
    process = ServerProcess("--max-content-chars", "1000")
    yield process
    process.close()
