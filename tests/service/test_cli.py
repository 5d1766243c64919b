"""The `genstruct-server` command: help, model errors, the `models` subcommand, a second signal."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import grpc.aio
from genstruct.v1 import genstruct_pb2_grpc

from tests.service.helpers import doc, read_log_until

ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(sys.executable).with_name("genstruct-server")


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(SERVER), *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_help_is_the_configuration_reference() -> None:
    code, out, _ = await _run("--help")
    assert code == 0
    for flag in ("--auth-token", "--tls-client-ca-file", "--drain-seconds", "--metrics-port",
                 "--max-batch-in-flight", "--fallback-to-demo", "--model"):
        assert flag in out


async def test_a_missing_model_file_exits_1_saying_why(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.gguf"
    env = {k: v for k, v in os.environ.items() if k != "GENSTRUCT_ENGINE_FACTORY"}
    code, _, err = await _run(
        "--model", str(missing), "--port", "0", "--metrics-port", "0", "--log-format", "text",
        env=env,
    )
    assert code == 1
    assert "cannot serve" in err and str(missing) in err


async def test_bad_settings_exit_2_with_one_line_each() -> None:
    code, out, err = await _run("--n-parallel", "8", "--n-batch", "4", "--port", "0")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "genstruct-server: n_batch (4) must be at least n_parallel (8): every generating "
        "slot adds a token to each decode step"
    ]
    code, _, err = await _run("--n-ubatch", "0")
    assert code == 2 and err.startswith("genstruct-server: n_ubatch: ") and "Traceback" not in err


async def test_an_empty_auth_token_exits_2_rather_than_serve_without_one(tmp_path: Path) -> None:
    for blank in ("", "  "):
        code, out, err = await _run(
            "--port", "0", "--metrics-port", "0",
            env={**os.environ, "GENSTRUCT_AUTH_TOKEN": blank},
        )
        assert code == 2 and out == ""
        assert err.strip().splitlines() == [
            "genstruct-server: auth_token is empty or blank, which would let every caller in; "
            "set a token, or unset GENSTRUCT_AUTH_TOKEN to serve without one"
        ]
    empty = tmp_path / "token"
    empty.write_text("\n")
    code, _, err = await _run("--port", "0", "--auth-token-file", str(empty))
    assert code == 2
    assert err.strip() == f"genstruct-server: auth_token_file {empty} is empty; put the token in it"


async def test_version_reports_the_llama_cpp_build() -> None:
    code, out, err = await _run("--version")
    assert code == 0, err
    first, build, system = out.strip().splitlines()
    assert first.startswith("genstruct-server ")
    assert build.startswith("llama.cpp: llama-cpp-python ") and "backends CPU" in build
    assert system.startswith("system info: CPU : ")


async def test_models_subcommand_is_dispatched() -> None:
    code, out, err = await _run("models", "list")
    assert code == 0, err
    assert "genstruct-7b" in out.lower()


async def test_a_second_signal_stops_at_once() -> None:
    env = dict(
        os.environ,
        GENSTRUCT_ENGINE_FACTORY="tests.fakes:make_engine",
        FAKE_ENGINE_TOKEN_DELAY="30",  # a request that would take minutes
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    process = await asyncio.create_subprocess_exec(
        str(SERVER), "--port", "0", "--metrics-port", "0", "--log-format", "json",
        "--drain-seconds", "600",
        cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )
    assert process.stderr is not None
    try:
        listening = await read_log_until(process.stderr, "listening")
        await read_log_until(process.stderr, "ready")
        async with grpc.aio.insecure_channel(str(listening["target"])) as channel:
            stub = genstruct_pb2_grpc.GenstructServiceStub(channel)
            call = stub.GenerateStream(doc(), timeout=60)
            await call.initial_metadata()  # the server has taken the call
            process.send_signal(signal.SIGTERM)
            await read_log_until(process.stderr, "draining")
            process.send_signal(signal.SIGINT)
            stopped = await read_log_until(process.stderr, "stopped")
            assert stopped["drained"] is False
            assert await asyncio.wait_for(process.wait(), 30) == 0
            try:
                await call.read()
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            else:
                raise AssertionError("the call in flight should have been cut off")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

