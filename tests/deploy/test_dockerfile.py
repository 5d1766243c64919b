"""The Dockerfile copies what exists, installs with the Makefile, runs as non-root, and its
health check command works against a running server."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path

from dockerfile_parse import DockerfileParser
from genstruct_service.config import Settings
from genstruct_service.server import start_server

from tests.fakes import FakeEngine

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[dict[str, str]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return list(parser.structure)


def of(kind: str) -> list[str]:
    return [i["value"] for i in instructions() if i["instruction"] == kind]


def test_every_copied_path_exists() -> None:
    for value in of("COPY"):
        parts = shlex.split(value)
        if any(p.startswith("--from") for p in parts):
            continue
        sources = [p for p in parts[:-1] if not p.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


def test_install_step_is_the_makefile_target_ci_uses() -> None:
    runs = [r for r in of("RUN") if r.startswith("make ")]
    assert runs == ["make .venv/.server && rm -rf /tmp/llama-wheels"]
    # The target exists and its recipe installs the server extra (a dry run builds nothing).
    dry = subprocess.run(
        ["make", "--dry-run", "--always-make", ".venv/.server"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert "pip install -e '.[server]'" in dry.stdout
    # llama.cpp comes from the project's own build first, never from pip's cache
    assert dry.stdout.index("tools/llama_build.py install") < dry.stdout.index("pip install -e")


def test_image_runs_as_non_root_and_binds_all_interfaces_explicitly() -> None:
    users = of("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    cmd = json.loads(of("CMD")[-1])
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert json.loads(of("ENTRYPOINT")[-1]) == ["genstruct-server"]


def test_cuda_is_the_default_and_cpu_a_build_argument() -> None:
    args = " ".join(of("ARG"))
    assert "nvidia/cuda" in args and "-DGGML_CUDA=on" in args


def healthcheck_command(port: int) -> list[str]:
    value = of("HEALTHCHECK")[-1]
    command = json.loads(value.split("CMD", 1)[1].strip())
    assert command[0] == "genstruct"
    return [a.replace("127.0.0.1:50051", f"127.0.0.1:{port}") for a in command]


async def run_healthcheck(port: int) -> tuple[int, str]:
    command = healthcheck_command(port)
    script = Path(sys.executable).parent / command[0]  # the console script the package ships
    process = await asyncio.create_subprocess_exec(
        str(script), *command[1:], stdout=PIPE, stderr=STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_healthcheck_command_follows_the_servers_health() -> None:
    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, log_format="text")
    server = await start_server(settings, None)  # loading: NOT_SERVING
    try:
        code, output = await run_healthcheck(server.port)
        assert code != 0, output
        await server.set_engine(FakeEngine())
        code, output = await run_healthcheck(server.port)
        assert code == 0, output
    finally:
        await server.stop(None)
    code, output = await run_healthcheck(server.port)  # nothing listening
    assert code != 0, output
