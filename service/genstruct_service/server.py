"""Builds and runs the gRPC server: the servicer, health, reflection, TLS, metrics and drain."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import grpc.aio
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_client.channel import KEEPALIVE, Keepalive
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .config import Settings
from .engine.types import Engine
from .interceptors import ServiceInterceptor
from .metrics import Metrics
from .preparation import PreparePool
from .servicer import GenstructServicer, ServiceState

log = logging.getLogger("genstruct_service.server")

SERVICE_NAME: str = genstruct_pb2.DESCRIPTOR.services_by_name["GenstructService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# grpc-stubs describes only the sync health servicer; the asyncio one is `health.aio`.
_AsyncHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]


class HealthServicer(Protocol):
    """What the server uses of grpc_health's asyncio HealthServicer."""

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
                  ) -> None: ...

    async def enter_graceful_shutdown(self) -> None: ...


def host_port(host: str, port: int) -> str:
    """`host:port`, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass
class RunningServer:
    """A started server and what a caller needs of it: the bound ports, health and drain.

    The engine stays the caller's: stopping the server does not close it. The server watches
    it, though: when it fails for good, health turns NOT_SERVING at once (see `engine_failed`).
    """

    server: grpc.aio.Server
    settings: Settings
    port: int  # the bound gRPC port (the real one when settings.port was 0)
    metrics_port: int | None  # the bound metrics port, None when metrics are off
    state: ServiceState
    health: HealthServicer
    metrics: Metrics
    prepare: PreparePool
    engine_failure: BaseException | None = None  # why the engine failed for good, if it did
    _watcher: asyncio.Task[BaseException] | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        """Where to connect, e.g. `127.0.0.1:50051` (a wildcard host becomes loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
            self.settings.host, self.settings.host
        )
        return host_port(host, self.port)

    async def set_engine(self, engine: Engine, *, stand_in: bool = False) -> None:
        """Start serving with `engine` (the model has loaded): health becomes SERVING.
        `stand_in`: its model is the demo stand-in, not Genstruct-7B (see Settings.constrained).
        """
        self.state.engine = engine
        self.state.stand_in = stand_in
        self.metrics.watch_engine(engine.stats)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, _SERVING)
        if self._watcher is not None:
            self._watcher.cancel()
        self._watcher = asyncio.create_task(self._watch(engine), name="engine-watcher")

    async def engine_failed(self) -> BaseException:
        """Return once the engine has failed for good; health is NOT_SERVING by then."""
        if self._watcher is None:
            raise RuntimeError("no engine yet: call set_engine first")
        # shielded: a caller that stops waiting must not stop the watching
        return await asyncio.shield(self._watcher)

    async def _watch(self, engine: Engine) -> BaseException:
        error = await engine.wait_failed()
        self.engine_failure = error
        # for good: NOT_SERVING for every service, and no later set() can undo it
        await self.health.enter_graceful_shutdown()
        log.error(
            "the engine failed and must be restarted: %s (health NOT_SERVING)",
            error,
            extra={"error": repr(error), "in_flight": self.state.active},
        )
        return error

    async def drain(self, seconds: float | None = None) -> bool:
        """Stop taking work and let in-flight work finish, then stop the server.

        Health turns NOT_SERVING and new calls get UNAVAILABLE at once; calls in flight have
        `seconds` (default settings.drain_seconds) to finish, after which they are cancelled.
        Returns True when everything finished in time.
        """
        seconds = self.settings.drain_seconds if seconds is None else seconds
        await self.health.enter_graceful_shutdown()
        if self.engine_failure is None:
            self.state.start_draining(seconds)
        # else the engine itself refuses new work, with a message naming the failure
        log.info("draining", extra={
            "in_flight": self.state.active, "documents": self.state.documents, "seconds": seconds,
        })
        finished = await self.state.wait_idle(seconds)
        if not finished:
            log.warning(
                "drain time is up; cancelling the work still in flight",
                extra={"in_flight": self.state.active},
            )
        # Finished calls only need to flush their last messages; the rest are cancelled.
        await self.stop(grace=1.0 if finished else 0.0)
        return finished

    async def stop(self, grace: float | None = None) -> None:
        """Stop at once (grace None) or after `grace` seconds for calls in flight."""
        if self._watcher is not None:
            # first, so the engine.close() that follows a stop is never taken for a failure
            self._watcher.cancel()
        await self.server.stop(grace)
        self.prepare.close()
        self.metrics.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    key = settings.tls_key_file.read_bytes()
    chain = settings.tls_cert_file.read_bytes()
    client_ca = (
        settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def start_server(
    settings: Settings,
    engine: Engine | None,
    *,
    metrics: Metrics | None = None,
    metrics_port: int | None = None,
    keepalive: Keepalive = KEEPALIVE,
) -> RunningServer:
    """Bind settings.host:settings.port, serve, and return the running server.

    With `engine=None` the server starts in the loading state (health NOT_SERVING, calls
    UNAVAILABLE) until `set_engine`. `metrics_port` overrides settings.metrics_port; there,
    0 means a free port chosen by the OS (tests), whereas settings.metrics_port = 0 means off.
    `keepalive` is the client's ping rate to accept (the client's own default unless a test
    pings faster).
    """
    metrics = metrics or Metrics()
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    max_documents = settings.max_queue + settings.n_parallel
    state = ServiceState(
        max_documents=max_documents,
        max_per_connection=max(1, int(max_documents * settings.queue_share_per_connection)),
    )
    server = grpc.aio.server(
        interceptors=[ServiceInterceptor(metrics, token, retry_delay=state.retry_delay)],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a taken port fails, not shares
            # The clients' keepalive pings, or gRPC's 5-minute minimum ends long silent calls
            # with GOAWAY "too_many_pings".
            *keepalive.server_options(),
        ],
    )
    prepare = PreparePool(settings.prepare_threads, settings.max_queue)
    genstruct_pb2_grpc.add_GenstructServiceServicer_to_server(
        GenstructServicer(settings, state, prepare, metrics), server
    )
    health_servicer: HealthServicer = _AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, _NOT_SERVING)
    # Reflection only describes the public contract, so it stays open like health.
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    address = host_port(settings.host, settings.port)
    credentials = _credentials(settings)
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    bound_metrics: int | None = None
    wanted = settings.metrics_port if metrics_port is None else metrics_port
    if metrics_port is not None or settings.metrics_port:
        try:
            bound_metrics = metrics.serve(settings.metrics_bind_host, wanted)
        except OSError:
            await server.stop(None)
            prepare.close()
            raise
    running = RunningServer(
        server=server,
        settings=settings,
        port=port,
        metrics_port=bound_metrics,
        state=state,
        health=health_servicer,
        metrics=metrics,
        prepare=prepare,
    )
    if engine is not None:
        await running.set_engine(engine)
    return running
