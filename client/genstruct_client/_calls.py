"""What the synchronous and the asyncio client share: their config, stream retries, health."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2

from genstruct_client.channel import ChannelConfig, resolve_target
from genstruct_client.errors import rich_error

# One server ("host:port", "dns:///name:port"), or several to balance across.
Target = str | Sequence[str] | None


def client_config(target: Target, config: ChannelConfig | None) -> ChannelConfig:
    """The config a client was given, or one for `target` (the default target when neither)."""
    if config is not None:
        if target is not None:
            raise TypeError("give either a target or a config, not both")
        return config
    return ChannelConfig() if target is None else ChannelConfig(resolve_target(target))


def remaining(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (a time.monotonic() value), never negative; None: none."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def health_request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def status_name(response: health_pb2.HealthCheckResponse) -> str:
    """"SERVING", "NOT_SERVING", ... for a Health.Check response."""
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class StreamAttempts:
    """The retries of one GenerateStream call, until its first message.

    gRPC retries nothing once a stream's headers have arrived, and the server sends them at
    once, so the clients retry a refused stream themselves, with the channel's RetryPolicy;
    a stream that delivered a message is never retried (its text would be sent twice).
    Iterating (sync or async) gives each attempt's timeout, after the backoff that precedes it.
    """

    def __init__(self, config: ChannelConfig, timeout: float | None) -> None:
        self._retry = config.retry
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._attempt = 0
        self._wait: float | None = 0.0
        self.received = False

    def failed(self, error: grpc.RpcError) -> None:
        """Note a failed attempt; raise it (a GenstructRpcError) when it is not to be retried.

        The next attempt waits at least the server's RetryInfo delay, when it sent one."""
        rich = rich_error(error)
        retry = self._retry
        if self.received or retry is None:
            raise rich from None
        self._wait = retry.delay(rich.code(), self._attempt, self._deadline, rich.retry_delay)
        if self._wait is None:
            raise rich from None

    def _next(self) -> float | None:
        if self._wait is None:
            raise RuntimeError("an attempt ended without failed() or a return")
        self._attempt += 1
        self._wait = None
        self.received = False
        return remaining(self._deadline)

    def __iter__(self) -> Iterator[float | None]:
        while True:
            time.sleep(self._wait or 0.0)
            yield self._next()

    async def __aiter__(self) -> AsyncIterator[float | None]:
        while True:
            await asyncio.sleep(self._wait or 0.0)
            yield self._next()
