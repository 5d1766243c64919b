"""A real gRPC server on 127.0.0.1 port 0 with the fake engine, and a channel to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2_grpc
from genstruct_service.config import Settings
from genstruct_service.metrics import Metrics
from genstruct_service.server import RunningServer, start_server

from tests.fakes import FakeEngine
from tests.service.helpers import make_settings


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def engine(metrics: Metrics) -> FakeEngine:
    return FakeEngine(on_step=metrics.on_step)


@pytest.fixture
async def server(
    settings: Settings, engine: FakeEngine, metrics: Metrics
) -> AsyncIterator[RunningServer]:
    running = await start_server(settings, engine, metrics=metrics, metrics_port=0)
    yield running
    engine.release()
    await running.stop(None)


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.target) as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> genstruct_pb2_grpc.GenstructServiceStub:
    return genstruct_pb2_grpc.GenstructServiceStub(channel)
