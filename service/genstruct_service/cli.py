"""`genstruct-server`: serve the model over gRPC (or `genstruct-server models ...`)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError

from . import __version__
from .config import Settings, settings_from_args
from .engine.types import Engine
from .errors import ModelError
from .logs import setup_logging
from .metrics import Metrics
from .server import RunningServer, host_port, start_server

log = logging.getLogger("genstruct_service.cli")
T = TypeVar("T")

# Testing hook: `module:function` building the engine instead of llama.cpp, called as
# function(settings, on_step=callable); e.g. tests.fakes:make_engine.
ENGINE_FACTORY_ENV = "GENSTRUCT_ENGINE_FACTORY"
# The exit code after the engine failed for good, so a supervisor restarts the process.
EXIT_ENGINE_FAILED = 3
# The drain after an engine failure: nothing can generate any more, so only the calls that
# can still answer (errors, GetModelInfo) need it.
FAILURE_DRAIN_SECONDS = 5.0


def main(argv: list[str] | None = None) -> int:
    """The console script; returns the exit code.

    0 also after a drain on SIGTERM/SIGINT; 3 (EXIT_ENGINE_FAILED) once the engine failed.
    """
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--version"]:
        sys.stdout.write(version_report() + "\n")
        return 0
    if args[:1] == ["models"]:
        from .model_files.cli import main as models_main

        return models_main(args[1:])
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            for line in message.splitlines():  # Settings gives each problem a line
                sys.stderr.write(f"genstruct-server: {field + ': ' if field else ''}{line}\n")
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        return asyncio.run(serve(settings))
    except ModelError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1


def version_report() -> str:
    """`genstruct-server --version`: the service's version and the llama.cpp build it runs."""
    lines = [f"genstruct-server {__version__}"]
    try:
        from .engine.backend.build_info import load_backends, read_build_info
    except ImportError as exc:  # the server extra is not installed
        lines.append(f"llama.cpp: not available ({exc})")
    else:
        load_backends()
        build = read_build_info()
        lines.append(f"llama.cpp: {build.summary()}")
        lines.append(f"system info: {build.system_info}")
    return "\n".join(lines)


def load_engine(settings: Settings, on_step: Callable[[int], None]) -> Engine:
    """Resolve the model (downloading if needed) and load it; blocking, run off the loop."""
    return load_model(settings, on_step)[0]


def load_model(settings: Settings, on_step: Callable[[int], None]) -> tuple[Engine, bool]:
    """The engine (see load_engine), and whether its model is a stand-in (the demo)."""
    factory_spec = os.environ.get(ENGINE_FACTORY_ENV)
    if factory_spec:
        module_name, _, attribute = factory_spec.partition(":")
        factory: Callable[..., Engine] = getattr(importlib.import_module(module_name), attribute)
        log.warning("engine from %s=%s (testing hook)", ENGINE_FACTORY_ENV, factory_spec)
        return factory(settings, on_step=on_step), False

    from .engine.llama import LlamaEngine
    from .model_files.registry import load_registry
    from .model_files.resolve import resolve_model
    from .prompt import GENSTRUCT_FORMAT

    try:
        model = resolve_model(settings.model, settings.models_dir)
    except ModelError as exc:
        if not settings.fallback_to_demo:
            raise
        fallback = load_registry().quickstart_fallback
        log.warning(
            "model %s is not available (%s); serving the stand-in %r instead "
            "(--fallback-to-demo): NOT Genstruct-7B, fit for trying the service only, and "
            "every response's model_name says so. %s",
            settings.model,
            exc,
            fallback,
            _constrained_note(settings),
        )
        model = resolve_model(fallback, settings.models_dir)
    else:
        if model.entry is not None and model.entry.stand_in:
            log.warning(
                "serving the stand-in %r: NOT Genstruct-7B, fit for trying the service only. %s",
                model.display_name,
                _constrained_note(settings),
            )
    stand_in = model.entry is not None and model.entry.stand_in
    log.info("loading %s from %s", model.display_name, model.path)
    engine = LlamaEngine(
        model.path,
        model_name=model.display_name,
        prompt_format=GENSTRUCT_FORMAT,
        n_parallel=settings.n_parallel,
        n_ctx=settings.n_ctx,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_ubatch,
        n_gpu_layers=settings.n_gpu_layers,
        n_threads=settings.threads,
        n_threads_batch=settings.threads_batch,
        flash_attn=settings.flash_attn,
        cache_type_k=settings.cache_type_k,
        cache_type_v=settings.cache_type_v,
        kv_unified=settings.kv_unified,
        max_queue=settings.max_queue,
        speculation=settings.speculation_settings,
        on_step=on_step,
    )
    return engine, stand_in


def _constrained_note(settings: Settings) -> str:
    """What the stand-in warning says of constrained output."""
    if settings.default_constrained(stand_in=True):
        return (
            "Output is grammar-constrained by default (it seldom writes the Genstruct markers "
            "by itself), so its pairs parse; a request may set constrained=false, and "
            "--constrained false turns the default off"
        )
    return (
        "Output is not constrained by default (--constrained false), so most of its pairs "
        "will not parse; send constrained=true to have them parse"
    )


def _in_thread(function: Callable[[], T]) -> asyncio.Future[T]:
    """Run `function` on a daemon thread, so a signal during a long load can still exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert result is not None
            future.set_result(result)

    def run() -> None:
        try:
            result = function()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="model-loader", daemon=True).start()
    return future


def how_to_call(running: RunningServer) -> list[str]:
    """Ready-to-paste ways to call the running server (the `genstruct` CLI, then bare stubs)."""
    settings = running.settings
    target = running.target
    flags = ""
    if settings.tls_enabled:
        flags += " --ca-cert <server CA .pem>"
        if settings.tls_client_ca_file is not None:
            flags += " --cert <client .pem> --key <client key .pem>"
    if settings.auth_token is not None:
        flags += " --token-file <file holding the token>"
    ways = [f"genstruct info --target {target}{flags}"]
    if not flags:
        ways.append(
            f"{sys.executable} -c \"import grpc; from genstruct.v1 import genstruct_pb2 as pb, "
            f"genstruct_pb2_grpc as rpc; print(rpc.GenstructServiceStub(grpc.insecure_channel("
            f"'{target}')).Generate(pb.GenerateRequest(document=pb.Document(title='Tides', "
            f"content='Tides are the rise and fall of sea levels caused by the Moon.'))))\""
        )
    return ways


async def serve(settings: Settings) -> int:
    """Listen at once (health NOT_SERVING), load the model, serve, and drain on a signal.

    Also drains, shortly, when the engine fails for good, and then returns EXIT_ENGINE_FAILED.
    """
    metrics = Metrics()
    running = await start_server(settings, None, metrics=metrics)
    metrics_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(  # where to reach a wildcard
        settings.metrics_bind_host, settings.metrics_bind_host
    )
    log.info(
        "listening on %s (loading the model; health NOT_SERVING until it is ready)",
        running.target,
        extra={
            "target": running.target,
            "tls": settings.tls_enabled,
            "mutual_tls": settings.tls_client_ca_file is not None,
            "auth_token": settings.auth_token is not None,
            "metrics": f"http://{host_port(metrics_host, running.metrics_port)}/metrics"
            if running.metrics_port
            else None,
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    loading = _in_thread(lambda: load_model(settings, metrics.on_step))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((loading, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        log.info("stopping before the model finished loading")
        loading.cancel()
        await running.stop(None)
        return 0
    try:
        engine, stand_in = loading.result()
    except BaseException:
        stopping.cancel()
        await running.stop(None)
        raise
    await running.set_engine(engine, stand_in=stand_in)
    info = engine.info
    log.info(
        "ready: serving %s on %s (health SERVING)",
        info.model_name,
        running.target,
        extra={"model": info.model_name, "backend": info.backend, "n_parallel": info.n_parallel},
    )
    for way in how_to_call(running):
        log.info("try: %s", way)
    failing = asyncio.ensure_future(running.engine_failed())
    await asyncio.wait((stopping, failing), return_when=asyncio.FIRST_COMPLETED)
    if failing.done():  # the server has logged why, and health says NOT_SERVING
        stopping.cancel()
        seconds = min(settings.drain_seconds, FAILURE_DRAIN_SECONDS)
        log.info(
            "draining for up to %.0f s, then exiting with code %d for a restart",
            seconds,
            EXIT_ENGINE_FAILED,
        )
    else:
        failing.cancel()
        seconds = settings.drain_seconds
        log.info(
            "signal received: draining for up to %.0f s (signal again to stop at once)",
            seconds,
        )
    stop.clear()
    draining = asyncio.ensure_future(running.drain(seconds))
    again = asyncio.ensure_future(stop.wait())
    await asyncio.wait((draining, again), return_when=asyncio.FIRST_COMPLETED)
    again.cancel()
    finished = False
    if draining.done():
        finished = draining.result()
    else:
        log.warning("signal during the drain: cancelling the work in flight")
        draining.cancel()
        await running.stop(None)
    # set by the server's watching, also when the engine failed during a signal's drain
    failure = running.engine_failure
    await engine.close()
    log.info("stopped", extra={"drained": finished, "engine_failed": failure is not None})
    return 0 if failure is None else EXIT_ENGINE_FAILED
