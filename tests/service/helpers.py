"""Helpers of the service tests: settings, requests, metrics scraping, health."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import grpc
import grpc.aio
from genstruct.v1 import genstruct_pb2
from genstruct_service.config import Settings
from genstruct_service.server import RunningServer
from grpc_health.v1 import health_pb2, health_pb2_grpc


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "max_batch_in_flight": 4,
        "log_format": "text",
    }
    values.update(overrides)
    return Settings(**values)


def doc(content: str = "Tides are caused by the Moon.", title: str = "Tides", **fields: Any
        ) -> genstruct_pb2.GenerateRequest:
    return genstruct_pb2.GenerateRequest(
        document=genstruct_pb2.Document(title=title, content=content), **fields
    )


async def scrape(server: RunningServer) -> dict[str, float]:
    """The server's metrics as {`name{labels}`: value}, fetched over HTTP."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    samples = {}
    for line in (await asyncio.to_thread(fetch)).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)




async def read_rest(call: Any) -> list[Any]:
    """The remaining messages of a call that was read with `read()` (the two APIs don't mix)."""
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


async def read_log_until(stream: asyncio.StreamReader, until: str) -> dict[str, object]:
    """Read a JSON-logging server's stderr up to the entry whose message starts with `until`."""
    while True:
        line = await asyncio.wait_for(stream.readline(), 60)
        if not line:
            raise AssertionError(f"the server exited before logging {until!r}")
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("msg", "").startswith(until):
            return dict(entry)
